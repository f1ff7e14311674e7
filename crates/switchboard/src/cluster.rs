//! The trunk adapter: joins this node's rooms to the same rooms on other
//! nodes. `sfu` and `trunk` do not know each other (DESIGN); this is the
//! small piece that translates between them.
//!
//! - Rooms: `Sfu::watch_rooms` opens and closes the room in the trunk core
//!   (its interest set), so a room link exists only where both nodes have
//!   the room open — nothing is created for a room nobody here is in.
//! - Per open room, one `sfu::RemoteLink` stands for every remote node: the
//!   media plane's origin-only events (local participants, tracks, media of
//!   subscribed tracks, chat, mute) become trunk calls, and the trunk's
//!   events (remote participants and tracks, subscriptions, keyframe
//!   requests, data, media) become link commands. The trunk core decides
//!   which node gets what (`media_targets`), the media plane which local
//!   participant does.
//! - Ids: sfu participant ids are 64-bit numbers in hex, so they map to the
//!   trunk's `ParticipantId` and back; a local track gets a `TrackId` here;
//!   a remote track is named `<node>-<wire id>` in the room.
//! - Chat and mute ride in `Data` as small JSON messages.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sfu::{
    CodecInfo, DisplayName, Kind, MediaPacket, RemoteCommand, RemoteEvent, RemoteSender, RoomEvent,
    RoomName, SeqExtender, Sfu, Source, TrackDescription,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use trunk::proto::{
    self, CodecParams, Event, Layer, NodeId, ParticipantId, ParticipantInfo, TrackId, TrackInfo,
    TrackKind, TrackSource, WireId,
};
use trunk::quic::{Identity, Trunk, TrunkConfig, TrunkEvent, TrunkEvents, TrunkStatus};

use crate::Config;
use crate::discovery::Discovery;

/// What `Data` carries between nodes (origin participant in the frame).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
enum DataMsg {
    Chat { text: String },
    Mute { audio: bool, video: bool },
}

/// The running cluster side of a node.
pub(crate) struct Cluster {
    trunk: Arc<Trunk>,
    task: JoinHandle<()>,
    node_id: u64,
    /// Local media for the trunk dropped between the rooms' links and the
    /// adapter (`LINK_MEDIA_QUEUE` full).
    drops: Arc<std::sync::atomic::AtomicU64>,
    refused: Arc<std::sync::atomic::AtomicU64>,
    /// `--peer-dns`: the task resolving the names, if any.
    discovery: Option<Discovery>,
    /// Set (with the reason) when a peer refused this node because another
    /// live node already uses its id: the binary exits on it.
    id_in_use: tokio::sync::watch::Receiver<Option<String>>,
}

/// Local media packets waiting between the rooms' link tasks and the
/// adapter before newer ones are dropped (counted): the adapter hands
/// them to the trunk's own bounded queue.
const LINK_MEDIA_QUEUE: usize = 4096;

impl Cluster {
    /// Start the trunk and the adapter if the node has a cluster identity
    /// (certificate files, or else a cluster secret).
    pub(crate) fn start(config: &Config, sfu: Arc<Sfu>) -> anyhow::Result<Option<Cluster>> {
        let identity = match (
            &config.trunk_ca,
            &config.trunk_cert,
            &config.trunk_key,
            &config.cluster_secret,
        ) {
            // The operator's CA binds each node's id into its certificate:
            // without --node-id, the certificate's id is this node's.
            (Some(ca), Some(cert), Some(key), _) => {
                let identity =
                    Identity::from_pem_files(ca, cert, key).context("trunk certificate files")?;
                let node_id = match (config.node_id, identity.node_id()) {
                    (Some(id), _) => id,
                    (None, Some(certified)) => certified.0,
                    (None, None) => rand::random(),
                };
                identity
                    .check_node_id(NodeId(node_id))
                    .context("trunk certificate files")?;
                (identity, node_id)
            }
            (None, None, None, Some(secret)) => {
                let node_id = config.node_id.unwrap_or_else(rand::random);
                let identity = Identity::from_secret(&secret.0, NodeId(node_id))
                    .context("--cluster-secret (SWITCHBOARD_CLUSTER_SECRET)")?;
                (identity, node_id)
            }
            (None, None, None, None) => return Ok(None),
            _ => anyhow::bail!("--trunk-ca, --trunk-cert and --trunk-key go together"),
        };
        let (identity, node_id) = identity;
        let (trunk, events) = Trunk::start(TrunkConfig {
            proto: proto::Config::new(NodeId(node_id), config.cluster_name.clone()),
            identity,
            bind: (config.bind, config.trunk_port).into(),
            peers: config
                .peers
                .iter()
                .map(|p| (NodeId(p.node_id), p.addr))
                .collect(),
            congestion: config.trunk_congestion.into(),
            tuning: Default::default(),
        })
        .context("starting the trunk")?;
        let trunk = Arc::new(trunk);
        let discovery = if config.peer_dns.is_empty() {
            None
        } else {
            Some(
                Discovery::start(
                    config.peer_dns.clone(),
                    config.dns_server,
                    std::time::Duration::from_secs(config.peer_dns_interval_secs.max(1)),
                    trunk.clone(),
                )
                .context("--peer-dns")?,
            )
        };
        let rooms = sfu.watch_rooms().context("watching rooms")?;
        let drops = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (id_in_use_tx, id_in_use) = tokio::sync::watch::channel(None);
        let (media_tx, media_rx) = mpsc::channel(LINK_MEDIA_QUEUE);
        let adapter = Adapter {
            sfu,
            trunk: trunk.clone(),
            rooms: HashMap::new(),
            remote_tracks: HashMap::new(),
            links: mpsc::unbounded_channel(),
            link_media: (media_tx, media_rx),
            drops: drops.clone(),
            refused: refused.clone(),
            id_in_use: id_in_use_tx,
            node_id,
            max_participants: config.max_participants_per_room,
            max_tracks: config.max_tracks_per_participant,
        };
        let task = tokio::spawn(adapter.run(events, rooms));
        Ok(Some(Cluster {
            trunk,
            task,
            node_id,
            drops,
            refused,
            discovery,
            id_in_use,
        }))
    }

    /// Resolves (with the reason) once a peer refused this node because
    /// another live node already uses its node id.
    pub(crate) async fn id_in_use(&self) -> String {
        let mut rx = self.id_in_use.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // The adapter stopped (shutdown): never.
            Err(_) => std::future::pending().await,
        }
    }

    pub(crate) fn trunk_addr(&self) -> std::net::SocketAddr {
        self.trunk.local_addr()
    }

    pub(crate) fn node_id(&self) -> u64 {
        self.node_id
    }

    pub(crate) async fn status(&self) -> Option<TrunkStatus> {
        self.trunk.status().await.ok()
    }

    /// Local media dropped on its way to the trunk adapter.
    pub(crate) fn adapter_drops(&self) -> u64 {
        self.drops.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Announcements from peers refused: a participant id another node (or
    /// this one) owns, a removal, track or message for a participant the
    /// sender does not own, or more participants or tracks than allowed.
    pub(crate) fn claims_refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The `--peer-dns` task's names and counters, if discovering.
    pub(crate) fn discovery(&self) -> Option<&Discovery> {
        self.discovery.as_ref()
    }

    /// Goodbye to every peer (call after the media plane has stopped).
    pub(crate) async fn shutdown(&self) {
        if let Some(d) = &self.discovery {
            d.stop();
        }
        self.task.abort();
        self.trunk.close().await;
    }
}

/// One open room as the adapter knows it.
struct RoomState {
    proto: proto::RoomName,
    /// Commands to the room's `RemoteLink`, straight into the worker's
    /// queue (its pump task owns the link and forwards its events).
    link: RemoteSender,
    pump: JoinHandle<()>,
    /// Local tracks: sfu id <-> trunk id.
    local_tracks: HashMap<String, TrackId>,
    local_by_id: HashMap<TrackId, String>,
    /// Which (node, layer) want each local track: the media plane is asked
    /// for its packets while anyone does.
    wanted: HashMap<TrackId, BTreeSet<(NodeId, Layer)>>,
    /// Remote tracks by sfu id.
    remote_by_name: HashMap<String, (NodeId, WireId)>,
    /// Who may speak for each participant: the node that announced it, or
    /// this node for its own (`local`). The media plane sees the trunk as
    /// one link for all peers, so this is where node C is kept from
    /// renaming, removing or speaking for node B's participants (or ours).
    owners: HashMap<ParticipantId, NodeId>,
    local: std::collections::HashSet<ParticipantId>,
}

impl RoomState {
    /// Whether `node` may act for `participant` here.
    fn owned_by(&self, participant: ParticipantId, node: NodeId) -> bool {
        self.owners.get(&participant) == Some(&node)
    }

    /// Participants `node` has announced in this room.
    fn announced_by(&self, node: NodeId) -> usize {
        self.owners.values().filter(|n| **n == node).count()
    }
}

impl Drop for RoomState {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// A remote track's route to the media plane.
struct RemoteTrack {
    room: RoomName,
    name: String,
    participant: ParticipantId,
    seq: SeqExtender,
}

struct Adapter {
    sfu: Arc<Sfu>,
    trunk: Arc<Trunk>,
    rooms: HashMap<RoomName, RoomState>,
    remote_tracks: HashMap<(NodeId, WireId), RemoteTrack>,
    /// Control events of every room's link, tagged with the room (as many
    /// as local joins, publishes and chat: not media).
    links: (
        mpsc::UnboundedSender<LinkEvent>,
        mpsc::UnboundedReceiver<LinkEvent>,
    ),
    /// Media of every room's link (bounded, drops counted in `drops`).
    link_media: (mpsc::Sender<LinkEvent>, mpsc::Receiver<LinkEvent>),
    drops: Arc<std::sync::atomic::AtomicU64>,
    /// Peer announcements refused (see `RoomState::owners`).
    refused: Arc<std::sync::atomic::AtomicU64>,
    /// Set when a peer refused us for our node id (another live node has it).
    id_in_use: tokio::sync::watch::Sender<Option<String>>,
    node_id: u64,
    /// Most participants one peer may announce in one room.
    max_participants: usize,
    /// Most tracks a peer may announce for one of its participants.
    max_tracks: usize,
}

type LinkEvent = (RoomName, RemoteEvent);

fn pid(id: &str) -> ParticipantId {
    match u64::from_str_radix(id, 16) {
        Ok(n) => ParticipantId(n),
        // Not one of ours (the media plane makes 16-hex-digit ids); keep
        // it stable anyway.
        Err(_) => {
            use std::hash::{DefaultHasher, Hash, Hasher};
            let mut h = DefaultHasher::new();
            id.hash(&mut h);
            ParticipantId(h.finish())
        }
    }
}

/// Count and log a refused peer announcement.
fn refuse(counter: &std::sync::atomic::AtomicU64, node: NodeId, what: &str) {
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    warn!(peer = node.0, "refused from a peer: {what}");
}

fn pid_name(p: ParticipantId) -> String {
    format!("{:016x}", p.0)
}

fn remote_name(node: NodeId, wire: WireId) -> String {
    format!("{:x}-w{}", node.0, wire.0)
}

fn to_proto_source(s: Source) -> TrackSource {
    match s {
        Source::Camera => TrackSource::Camera,
        Source::Microphone => TrackSource::Microphone,
        Source::Screen => TrackSource::Screen,
        Source::ScreenAudio => TrackSource::ScreenAudio,
        Source::Unknown => TrackSource::Other,
    }
}

fn from_proto_source(s: TrackSource) -> Source {
    match s {
        TrackSource::Camera => Source::Camera,
        TrackSource::Microphone => Source::Microphone,
        TrackSource::Screen => Source::Screen,
        TrackSource::ScreenAudio => Source::ScreenAudio,
        TrackSource::Other => Source::Unknown,
    }
}

impl Adapter {
    async fn run(mut self, mut events: TrunkEvents, mut rooms: mpsc::UnboundedReceiver<RoomEvent>) {
        loop {
            tokio::select! {
                e = events.recv() => match e {
                    Some(e) => self.trunk_event(e).await,
                    None => return,
                },
                r = rooms.recv() => match r {
                    Some(RoomEvent::Opened(room)) => self.open(room).await,
                    Some(RoomEvent::Closed(room)) => self.close(&room).await,
                    None => return,
                },
                Some((room, e)) = self.links.1.recv() => self.link_event(room, e).await,
                Some((room, e)) = self.link_media.1.recv() => self.link_event(room, e).await,
            }
        }
    }

    async fn open(&mut self, room: RoomName) {
        let Ok(proto_room) = proto::RoomName::new(room.as_str()) else {
            return; // both validate the same way; cannot happen
        };
        let r = proto_room.clone();
        if let Err(e) = self.trunk.call(move |n, now| n.open_room(r, now)).await {
            warn!(%room, error = %e, "cannot open room on the trunk");
            return;
        }
        let Ok(mut link) = self.sfu.attach(room.clone(), "trunk") else {
            return;
        };
        let sender = link.sender();
        let tx = self.links.0.clone();
        let media = self.link_media.0.clone();
        let drops = self.drops.clone();
        let name = room.clone();
        let pump = tokio::spawn(async move {
            while let Some(e) = link.recv().await {
                if matches!(e, RemoteEvent::Media { .. }) {
                    if media.try_send((name.clone(), e)).is_err() {
                        drops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    continue;
                }
                let closed = e == RemoteEvent::Closed;
                let _ = tx.send((name.clone(), e));
                if closed {
                    return;
                }
            }
        });
        debug!(%room, "room open on the trunk");
        self.rooms.insert(
            room,
            RoomState {
                proto: proto_room,
                link: sender,
                pump,
                local_tracks: HashMap::new(),
                local_by_id: HashMap::new(),
                wanted: HashMap::new(),
                remote_by_name: HashMap::new(),
                owners: HashMap::new(),
                local: Default::default(),
            },
        );
    }

    async fn close(&mut self, room: &RoomName) {
        let Some(state) = self.rooms.remove(room) else {
            return;
        };
        self.remote_tracks.retain(|_, t| &t.room != room);
        let r = state.proto.clone();
        let _ = self.trunk.call(move |n, now| n.close_room(&r, now)).await;
        debug!(%room, "room closed on the trunk");
    }

    /// The media plane says something about a room: tell the other nodes.
    async fn link_event(&mut self, room: RoomName, e: RemoteEvent) {
        let Some(state) = self.rooms.get_mut(&room) else {
            return;
        };
        let r = state.proto.clone();
        let result = match e {
            RemoteEvent::Media { track, packet } => {
                if let Some(tid) = state.local_tracks.get(&track) {
                    self.trunk.send_media(
                        *tid,
                        Layer(0),
                        Bytes::from(packet.to_rtp()),
                        packet.arrival,
                    );
                }
                return;
            }
            RemoteEvent::ParticipantJoined { id, name } => {
                state.local.insert(pid(&id));
                let info = ParticipantInfo {
                    id: pid(&id),
                    display_name: name,
                };
                self.trunk
                    .call(move |n, _| n.participant_joined(&r, info).map(|_| ()))
                    .await
            }
            RemoteEvent::ParticipantLeft { id } => {
                let p = pid(&id);
                state.local.remove(&p);
                self.trunk
                    .call(move |n, _| n.participant_left(&r, p).map(|_| ()))
                    .await
            }
            RemoteEvent::Mute { id, audio, video } => {
                let payload =
                    serde_json::to_vec(&DataMsg::Mute { audio, video }).unwrap_or_default();
                let p = pid(&id);
                self.trunk
                    .call(move |n, _| n.send_data(&r, p, &payload).map(|_| ()))
                    .await
            }
            RemoteEvent::Chat { from, text, .. } => {
                let payload = serde_json::to_vec(&DataMsg::Chat { text }).unwrap_or_default();
                let p = pid(&from);
                self.trunk
                    .call(move |n, _| n.send_data(&r, p, &payload).map(|_| ()))
                    .await
            }
            RemoteEvent::TrackAdded(desc) => {
                let tid = TrackId(rand::random());
                state.local_tracks.insert(desc.id.clone(), tid);
                state.local_by_id.insert(tid, desc.id.clone());
                let info = TrackInfo {
                    participant: pid(&desc.participant),
                    kind: match desc.kind {
                        Kind::Audio => TrackKind::Audio,
                        Kind::Video => TrackKind::Video,
                    },
                    source: to_proto_source(desc.source),
                    codec: CodecParams {
                        mime_type: desc.codec.mime_type,
                        clock_rate: desc.codec.clock_rate,
                        channels: desc.codec.channels,
                        payload_type: desc.codec.payload_type,
                        fmtp: desc.codec.fmtp,
                    },
                    layers: vec![String::new()],
                };
                self.trunk
                    .call(move |n, _| n.publish_track(&r, tid, info).map(|_| ()))
                    .await
            }
            RemoteEvent::TrackRemoved { id } => {
                let Some(tid) = state.local_tracks.remove(&id) else {
                    return;
                };
                state.local_by_id.remove(&tid);
                state.wanted.remove(&tid);
                self.trunk
                    .call(move |n, _| n.unpublish_track(&r, tid))
                    .await
            }
            RemoteEvent::Subscribe { track } => {
                let Some(&(node, wire)) = state.remote_by_name.get(&track) else {
                    return;
                };
                self.trunk
                    .call(move |n, _| n.subscribe(&r, node, wire, Layer(0)))
                    .await
            }
            RemoteEvent::KeyframeRequest { track } => {
                let Some(&(node, wire)) = state.remote_by_name.get(&track) else {
                    return;
                };
                self.trunk
                    .call(move |n, now| n.request_keyframe(&r, node, wire, now))
                    .await
            }
            RemoteEvent::Closed => {
                // The room closed here; `RoomEvent::Closed` does the rest.
                return;
            }
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(%room, error = %e, "trunk refused a local change"),
            Err(e) => warn!(error = %e, "trunk stopped"),
        }
    }

    /// Another node says something: tell the media plane.
    async fn trunk_event(&mut self, e: TrunkEvent) {
        let e = match e {
            TrunkEvent::Media {
                node,
                wire_id,
                packet,
                origin,
                ..
            } => {
                let Some(t) = self.remote_tracks.get_mut(&(node, wire_id)) else {
                    return;
                };
                let Ok(packet) = MediaPacket::from_rtp(&packet, &mut t.seq, origin) else {
                    return;
                };
                if let Some(state) = self.rooms.get(&t.room) {
                    state.link.send(RemoteCommand::Media {
                        track: t.name.clone(),
                        packet,
                    });
                }
                return;
            }
            TrunkEvent::Proto(e) => e,
        };
        let room_of = |r: &proto::RoomName| RoomName::parse(r.as_str()).ok();
        match e {
            Event::RemoteParticipantAdded {
                room,
                node,
                participant,
            } => {
                let Some(state) = room_of(&room).and_then(|r| self.rooms.get_mut(&r)) else {
                    return;
                };
                let id = participant.id;
                let ok = !state.local.contains(&id)
                    && match state.owners.get(&id) {
                        Some(owner) => *owner == node, // its own, again (a rename)
                        None => state.announced_by(node) < self.max_participants,
                    };
                if !ok {
                    refuse(&self.refused, node, "a participant it may not announce");
                    return;
                }
                state.owners.insert(id, node);
                let name = DisplayName::parse(&participant.display_name)
                    .or_else(|_| DisplayName::parse("guest"));
                if let Ok(name) = name {
                    state.link.send(RemoteCommand::ParticipantJoined {
                        id: pid_name(id),
                        name,
                    });
                }
            }
            Event::RemoteParticipantRemoved {
                room,
                node,
                participant,
            } => {
                let Some(state) = room_of(&room).and_then(|r| self.rooms.get_mut(&r)) else {
                    return;
                };
                if !state.owned_by(participant, node) {
                    refuse(
                        &self.refused,
                        node,
                        "removal of a participant it does not own",
                    );
                    return;
                }
                state.owners.remove(&participant);
                state.link.send(RemoteCommand::ParticipantLeft {
                    id: pid_name(participant),
                });
            }
            Event::RemoteTrackAdded {
                room,
                node,
                wire_id,
                track,
            } => {
                let Some(r) = room_of(&room) else { return };
                let Some(state) = self.rooms.get_mut(&r) else {
                    return;
                };
                if !state.owned_by(track.participant, node) {
                    refuse(
                        &self.refused,
                        node,
                        "a track for a participant it does not own",
                    );
                    return;
                }
                // Capped like a browser's tracks (counted from the routes:
                // remote tracks are few per room).
                let count = self
                    .remote_tracks
                    .values()
                    .filter(|t| t.room == r && t.participant == track.participant)
                    .count();
                if count >= self.max_tracks {
                    refuse(
                        &self.refused,
                        node,
                        "more tracks for one participant than allowed",
                    );
                    return;
                }
                let name = remote_name(node, wire_id);
                state.remote_by_name.insert(name.clone(), (node, wire_id));
                self.remote_tracks.insert(
                    (node, wire_id),
                    RemoteTrack {
                        room: r,
                        name: name.clone(),
                        participant: track.participant,
                        seq: SeqExtender::default(),
                    },
                );
                state.link.send(RemoteCommand::TrackAdded(TrackDescription {
                    id: name,
                    participant: pid_name(track.participant),
                    kind: match track.kind {
                        TrackKind::Audio => Kind::Audio,
                        TrackKind::Video => Kind::Video,
                    },
                    source: from_proto_source(track.source),
                    codec: CodecInfo {
                        mime_type: track.codec.mime_type,
                        clock_rate: track.codec.clock_rate,
                        channels: track.codec.channels,
                        payload_type: track.codec.payload_type,
                        fmtp: track.codec.fmtp,
                    },
                }));
            }
            Event::RemoteTrackRemoved {
                room,
                node,
                wire_id,
            } => {
                self.remote_tracks.remove(&(node, wire_id));
                let Some(state) = room_of(&room).and_then(|r| self.rooms.get_mut(&r)) else {
                    return;
                };
                let name = remote_name(node, wire_id);
                state.remote_by_name.remove(&name);
                state.link.send(RemoteCommand::TrackRemoved { id: name });
            }
            Event::SubscribeRequested {
                room,
                node,
                track,
                layer,
            } => self.want(&room, node, track, layer, true),
            Event::SubscribeCancelled {
                room,
                node,
                track,
                layer,
            } => self.want(&room, node, track, layer, false),
            Event::KeyframeRequested { room, track } => {
                let Some(state) = room_of(&room).and_then(|r| self.rooms.get(&r)) else {
                    return;
                };
                if let Some(name) = state.local_by_id.get(&track) {
                    state.link.send(RemoteCommand::KeyframeRequest {
                        track: name.clone(),
                    });
                }
            }
            Event::DataReceived {
                room,
                node,
                from,
                payload,
            } => {
                let Some(state) = room_of(&room).and_then(|r| self.rooms.get(&r)) else {
                    return;
                };
                // The trunk core already drops data naming a participant the
                // peer did not announce in the room (`foreign_data_drops`);
                // this refuses one it announced although another node (or
                // this one) owns that id, a claim the core cannot judge.
                if !state.owned_by(from, node) {
                    refuse(
                        &self.refused,
                        node,
                        "a message from a participant it does not own",
                    );
                    return;
                }
                let id = pid_name(from);
                match serde_json::from_slice::<DataMsg>(&payload) {
                    // Another node is held to the same limits as a browser.
                    Ok(DataMsg::Chat { text })
                        if !text.trim().is_empty()
                            && text.chars().count() <= signal::MAX_CHAT_CHARS =>
                    {
                        state.link.send(RemoteCommand::Chat { from: id, text });
                    }
                    Ok(DataMsg::Chat { .. }) => debug!("oversized or empty chat from a peer"),
                    Ok(DataMsg::Mute { audio, video }) => {
                        state.link.send(RemoteCommand::Mute { id, audio, video });
                    }
                    Err(e) => debug!(error = %e, "unreadable data from a peer"),
                }
            }
            Event::LinkDown { node, reason } => {
                // The core removes the node's participants first; nothing
                // of it may outlive the link either way.
                for state in self.rooms.values_mut() {
                    state.owners.retain(|_, n| *n != node);
                }
                if reason == proto::CloseCode::NodeIdInUse {
                    let _ = self.id_in_use.send(Some(format!(
                        "node id {} is already used by another live node: peer node {} \
                         refused this one (the later). Give every node its own --node-id",
                        self.node_id, node.0
                    )));
                }
            }
            // The driver logged it (with the addresses); the core counted it.
            Event::LinkUp { .. }
            | Event::Redial { .. }
            | Event::Dial { .. }
            | Event::Refused { .. } => {}
        }
    }

    /// A node started or stopped wanting a local track.
    fn want(
        &mut self,
        room: &proto::RoomName,
        node: NodeId,
        track: TrackId,
        layer: Layer,
        on: bool,
    ) {
        let Some(state) = RoomName::parse(room.as_str())
            .ok()
            .and_then(|r| self.rooms.get_mut(&r))
        else {
            return;
        };
        let Some(name) = state.local_by_id.get(&track).cloned() else {
            return;
        };
        let set = state.wanted.entry(track).or_default();
        let before = set.is_empty();
        if on {
            set.insert((node, layer));
        } else {
            set.remove(&(node, layer));
        }
        let after = set.is_empty();
        if before && !after {
            info!(track = %name, peer = node.0, "a node subscribed to a local track");
            state.link.send(RemoteCommand::Subscribe { track: name });
        } else if !before && after {
            state.link.send(RemoteCommand::Unsubscribe { track: name });
        } else if on {
            // Another node joins an existing subscription: it needs a keyframe.
            state
                .link
                .send(RemoteCommand::KeyframeRequest { track: name });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn participant_ids_map_to_the_trunk_and_back() {
        for id in ["0000000000000001", "ffffffffffffffff", "70ee9e15d57ad88b"] {
            assert_eq!(pid_name(pid(id)), id);
        }
        // Not one of ours: still a stable number.
        assert_eq!(pid("not hex"), pid("not hex"));
        assert_ne!(pid("not hex"), pid("other"));
    }

    #[test]
    fn data_messages_have_a_stable_wire_form() {
        let chat = serde_json::to_string(&DataMsg::Chat { text: "hi".into() }).unwrap();
        assert_eq!(chat, r#"{"t":"chat","text":"hi"}"#);
        let mute = serde_json::to_string(&DataMsg::Mute {
            audio: true,
            video: false,
        })
        .unwrap();
        assert_eq!(mute, r#"{"t":"mute","audio":true,"video":false}"#);
        assert!(serde_json::from_slice::<DataMsg>(b"\xff garbage").is_err());
    }

    #[test]
    fn track_sources_survive_the_round_trip() {
        for s in [
            Source::Camera,
            Source::Microphone,
            Source::Screen,
            Source::ScreenAudio,
            Source::Unknown,
        ] {
            assert_eq!(from_proto_source(to_proto_source(s)), s);
        }
    }
}
