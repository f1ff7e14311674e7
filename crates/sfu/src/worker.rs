//! PLACEHOLDER worker so the API compiles; the media helper replaces this
//! file (and adds modules) with the real str0m worker.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, unbounded};
use signal::{DisplayName, RoomName, ServerMessage};

use crate::{Participant, ParticipantCommand, RoomStatus, SfuConfig, SfuError, SfuMetrics};

enum Cmd {
    Join {
        id: String,
        room: RoomName,
        name: DisplayName,
        events: tokio::sync::mpsc::UnboundedSender<ServerMessage>,
    },
    #[expect(dead_code, reason = "placeholder: the real worker reads these")]
    Participant(String, ParticipantCommand),
    Leave(String),
    Status(tokio::sync::oneshot::Sender<Vec<RoomStatus>>),
    Shutdown,
}

#[derive(Clone)]
pub(crate) struct Commands {
    tx: Sender<Cmd>,
}

impl Commands {
    pub(crate) fn participant(&self, id: &str, cmd: ParticipantCommand) {
        let _ = self.tx.send(Cmd::Participant(id.to_owned(), cmd));
    }
    pub(crate) fn leave(&self, id: &str) {
        let _ = self.tx.send(Cmd::Leave(id.to_owned()));
    }
}

pub(crate) struct Handle {
    commands: Commands,
    addr: SocketAddr,
    metrics: Arc<SfuMetrics>,
    thread: Option<JoinHandle<()>>,
}

impl Handle {
    pub(crate) fn start(config: SfuConfig) -> Result<Handle, SfuError> {
        let addr = SocketAddr::new(config.bind, config.media_port);
        let socket = UdpSocket::bind(addr).map_err(|source| SfuError::Bind { addr, source })?;
        let addr = socket.local_addr().map_err(SfuError::Worker)?;
        let (tx, rx) = unbounded();
        let metrics = Arc::new(SfuMetrics::default());
        let thread = std::thread::Builder::new()
            .name("sfu-worker".into())
            .spawn(move || run(rx))
            .map_err(SfuError::Worker)?;
        Ok(Handle {
            commands: Commands { tx },
            addr,
            metrics,
            thread: Some(thread),
        })
    }
    pub(crate) fn media_addr(&self) -> SocketAddr {
        self.addr
    }
    pub(crate) fn metrics(&self) -> Arc<SfuMetrics> {
        self.metrics.clone()
    }
    pub(crate) fn join(&self, room: RoomName, name: DisplayName) -> Result<Participant, SfuError> {
        let id = format!("{:016x}", rand::random::<u64>());
        let (etx, erx) = tokio::sync::mpsc::unbounded_channel();
        self.commands
            .tx
            .send(Cmd::Join {
                id: id.clone(),
                room,
                name,
                events: etx,
            })
            .map_err(|_| SfuError::Stopped)?;
        Ok(Participant {
            id,
            commands: self.commands.clone(),
            events: erx,
        })
    }
    pub(crate) async fn status(&self) -> Result<Vec<RoomStatus>, SfuError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.commands
            .tx
            .send(Cmd::Status(tx))
            .map_err(|_| SfuError::Stopped)?;
        rx.await.map_err(|_| SfuError::Stopped)
    }
    pub(crate) fn shutdown(mut self) {
        self.stop();
    }
    fn stop(&mut self) {
        let _ = self.commands.tx.send(Cmd::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(rx: Receiver<Cmd>) {
    let mut sessions: Vec<(String, tokio::sync::mpsc::UnboundedSender<ServerMessage>)> = Vec::new();
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Cmd::Join {
                id,
                room,
                name,
                events,
            } => {
                let _ = events.send(ServerMessage::Joined {
                    participant_id: id.clone(),
                    room: room.to_string(),
                    name: name.to_string(),
                });
                sessions.push((id, events));
            }
            Cmd::Participant(..) => {}
            Cmd::Leave(id) => sessions.retain(|(i, _)| *i != id),
            Cmd::Status(reply) => {
                let _ = reply.send(Vec::new());
            }
            Cmd::Shutdown => break,
        }
    }
}
