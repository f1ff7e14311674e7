//! What other threads hold: the commands they send the worker ([`Cmd`]),
//! the channel and waker that carry them ([`Commands`]), and [`Handle`],
//! which binds the media socket, starts the worker thread and stops it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, unbounded};
use mio::net::UdpSocket;
use mio::{Interest, Poll, Token, Waker};
use signal::{DisplayName, RoomName, ServerMessage};
use tokio::sync::mpsc::UnboundedSender;

use super::tcp::{LISTENER, TcpMedia};
use super::{LinkKey, Worker};
use crate::remote::{
    REMOTE_MEDIA_IN_QUEUE, REMOTE_MEDIA_QUEUE, RemoteCommand, RemoteEvent, RemoteLink, RoomEvent,
};
use crate::{
    Participant, ParticipantCommand, Permissions, RoomStatus, SfuConfig, SfuError, SfuMetrics,
};

/// Requested UDP buffer sizes (the kernel caps them at `net.core.[rw]mem_max`).
const SOCKET_BUFFER: usize = 4 << 20;

pub(super) const SOCKET: Token = Token(0);
pub(super) const WAKER: Token = Token(1);

/// With `media_port` 0: how many free UDP ports to try before giving up on
/// finding one whose number is free for TCP too.
const PORT_TRIES: usize = 20;

/// What other threads ask of the worker (applied in `Worker::command`).
pub(super) enum Cmd {
    Join {
        id: String,
        room: RoomName,
        name: DisplayName,
        permissions: Permissions,
        events: UnboundedSender<ServerMessage>,
    },
    Participant(String, ParticipantCommand),
    Leave(String),
    Attach {
        key: LinkKey,
        room: RoomName,
        node: String,
        control: UnboundedSender<RemoteEvent>,
        media: tokio::sync::mpsc::Sender<RemoteEvent>,
    },
    Remote(LinkKey, RemoteCommand),
    Detach(LinkKey),
    WatchRooms(UnboundedSender<RoomEvent>),
    Status(tokio::sync::oneshot::Sender<Vec<RoomStatus>>),
    Shutdown,
    /// Test hooks (feature `test-hooks`).
    #[cfg(any(feature = "test-hooks", debug_assertions))]
    PanicInParticipant(String),
    #[cfg(any(feature = "test-hooks", debug_assertions))]
    PanicInWorker,
}

/// Sends commands to the worker and wakes it.
#[derive(Clone)]
pub(crate) struct Commands {
    tx: Sender<Cmd>,
    waker: Arc<Waker>,
    /// Remote media packets queued and not yet taken by the worker.
    media_queued: Arc<AtomicUsize>,
    metrics: Arc<SfuMetrics>,
}

impl Commands {
    fn send(&self, cmd: Cmd) -> Result<(), SfuError> {
        self.tx.send(cmd).map_err(|_| SfuError::Stopped)?;
        // A failed wake means the poll is gone, i.e. the worker has stopped.
        self.waker.wake().map_err(|_| SfuError::Stopped)
    }
    pub(crate) fn participant(&self, id: &str, cmd: ParticipantCommand) {
        let _ = self.send(Cmd::Participant(id.to_owned(), cmd));
    }
    #[cfg(any(feature = "test-hooks", debug_assertions))]
    pub(crate) fn panic_in_participant(&self, id: &str) {
        let _ = self.send(Cmd::PanicInParticipant(id.to_owned()));
    }
    #[cfg(any(feature = "test-hooks", debug_assertions))]
    pub(crate) fn panic_in_worker(&self) {
        let _ = self.send(Cmd::PanicInWorker);
    }
    pub(crate) fn leave(&self, id: &str) {
        let _ = self.send(Cmd::Leave(id.to_owned()));
    }
    pub(crate) fn remote(&self, key: LinkKey, cmd: RemoteCommand) {
        if matches!(cmd, RemoteCommand::Media { .. }) {
            // Bounded: a trunk faster than the worker loses media, counted,
            // instead of growing the queue.
            if self.media_queued.fetch_add(1, Ordering::Relaxed) >= REMOTE_MEDIA_IN_QUEUE {
                self.media_queued.fetch_sub(1, Ordering::Relaxed);
                self.metrics
                    .remote_media_in_dropped
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let _ = self.send(Cmd::Remote(key, cmd));
    }
    pub(crate) fn detach(&self, key: LinkKey) {
        let _ = self.send(Cmd::Detach(key));
    }
}

/// The media UDP socket and, with `config.tcp`, the ICE-TCP listener on
/// the same port number. With port 0 the kernel picks the UDP port, and
/// that number must also be free for TCP: if not, another is tried.
fn bind_media(
    config: &SfuConfig,
) -> Result<(std::net::UdpSocket, Option<mio::net::TcpListener>), SfuError> {
    let addr = SocketAddr::new(config.bind, config.media_port);
    let tries = if config.media_port == 0 {
        PORT_TRIES
    } else {
        1
    };
    let mut last = None;
    for _ in 0..tries {
        let udp =
            std::net::UdpSocket::bind(addr).map_err(|source| SfuError::Bind { addr, source })?;
        if !config.tcp {
            return Ok((udp, None));
        }
        let port = udp.local_addr().map_err(SfuError::Worker)?.port();
        let tcp_addr = SocketAddr::new(config.bind, port);
        match mio::net::TcpListener::bind(tcp_addr) {
            Ok(l) => return Ok((udp, Some(l))),
            Err(source) => {
                last = Some(SfuError::BindTcp {
                    addr: tcp_addr,
                    source,
                })
            }
        }
    }
    Err(last.unwrap_or(SfuError::BindTcp {
        addr,
        source: std::io::ErrorKind::AddrInUse.into(),
    }))
}

pub(crate) struct Handle {
    commands: Commands,
    next_link: std::sync::atomic::AtomicU64,
    addr: SocketAddr,
    metrics: Arc<SfuMetrics>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Handle {
    pub(crate) fn start(config: SfuConfig) -> Result<Handle, SfuError> {
        let (std_socket, listener) = bind_media(&config)?;
        std_socket.set_nonblocking(true).map_err(SfuError::Worker)?;
        // The default receive buffer (~200 KiB) holds well under 100 video
        // packets: one slow turn of the loop (a DTLS handshake, a burst of
        // keyframes) would overflow it and lose media for every subscriber.
        let sock = socket2::SockRef::from(&std_socket);
        let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
        let local = std_socket.local_addr().map_err(SfuError::Worker)?;
        let mut socket = UdpSocket::from_std(std_socket);
        let poll = Poll::new().map_err(SfuError::Worker)?;
        poll.registry()
            .register(&mut socket, SOCKET, Interest::READABLE)
            .map_err(SfuError::Worker)?;
        let tcp = match listener {
            Some(mut listener) => {
                poll.registry()
                    .register(&mut listener, LISTENER, Interest::READABLE)
                    .map_err(SfuError::Worker)?;
                let registry = poll.registry().try_clone().map_err(SfuError::Worker)?;
                Some(TcpMedia::new(
                    listener,
                    registry,
                    config.max_tcp_connections,
                    config.tcp_handshake_timeout,
                ))
            }
            None => None,
        };
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(SfuError::Worker)?);
        let (tx, rx) = unbounded();
        let metrics = Arc::new(SfuMetrics::default());
        let media_queued = Arc::new(AtomicUsize::new(0));
        // The address browsers are told: the public one if configured. str0m
        // only accepts STUN addressed to a local candidate, so datagrams are
        // fed to it as if addressed there.
        let advertised = SocketAddr::new(config.public_ip.unwrap_or(config.bind), local.port());
        let worker = Worker::new(
            config,
            socket,
            tcp,
            advertised,
            metrics.clone(),
            media_queued.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("sfu-worker".into())
            .spawn(move || worker.run(poll, rx))
            .map_err(SfuError::Worker)?;
        Ok(Handle {
            commands: Commands {
                tx,
                waker,
                media_queued,
                metrics: metrics.clone(),
            },
            next_link: std::sync::atomic::AtomicU64::new(1),
            addr: local,
            metrics,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }
    pub(crate) fn media_addr(&self) -> SocketAddr {
        self.addr
    }
    pub(crate) fn is_running(&self) -> bool {
        let thread = match self.thread.lock() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        };
        thread.as_ref().is_some_and(|t| !t.is_finished())
    }
    pub(crate) fn metrics(&self) -> Arc<SfuMetrics> {
        self.metrics.clone()
    }
    pub(crate) fn join(
        &self,
        room: RoomName,
        name: DisplayName,
        permissions: Permissions,
    ) -> Result<Participant, SfuError> {
        let id = format!("{:016x}", rand::random::<u64>());
        let (etx, erx) = tokio::sync::mpsc::unbounded_channel();
        self.commands.send(Cmd::Join {
            id: id.clone(),
            room,
            name,
            permissions,
            events: etx,
        })?;
        Ok(Participant {
            id,
            commands: self.commands.clone(),
            events: erx,
        })
    }
    pub(crate) fn attach(&self, room: RoomName, node: String) -> Result<RemoteLink, SfuError> {
        let key = self.next_link.fetch_add(1, Ordering::Relaxed);
        let (ctx, crx) = tokio::sync::mpsc::unbounded_channel();
        let (mtx, mrx) = tokio::sync::mpsc::channel(REMOTE_MEDIA_QUEUE);
        self.commands.send(Cmd::Attach {
            key,
            room,
            node,
            control: ctx,
            media: mtx,
        })?;
        Ok(RemoteLink {
            key,
            commands: self.commands.clone(),
            control: crx,
            media: mrx,
        })
    }
    pub(crate) fn watch_rooms(
        &self,
    ) -> Result<tokio::sync::mpsc::UnboundedReceiver<RoomEvent>, SfuError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.commands.send(Cmd::WatchRooms(tx))?;
        Ok(rx)
    }
    pub(crate) async fn status(&self) -> Result<Vec<RoomStatus>, SfuError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.commands.send(Cmd::Status(tx))?;
        rx.await.map_err(|_| SfuError::Stopped)
    }
    #[cfg(any(feature = "test-hooks", debug_assertions))]
    pub(crate) fn panic_in_worker(&self) {
        self.commands.panic_in_worker();
    }
    #[cfg(any(feature = "test-hooks", debug_assertions))]
    pub(crate) fn panic_in_participant(&self, id: &str) {
        self.commands.panic_in_participant(id);
    }

    /// Stop the worker (every participant is told `shutting_down`) and wait
    /// for its thread. Idempotent.
    pub(crate) fn stop(&self) {
        let _ = self.commands.send(Cmd::Shutdown);
        let thread = match self.thread.lock() {
            Ok(mut t) => t.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop();
    }
}
