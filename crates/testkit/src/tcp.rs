//! ICE-TCP for a [`crate::MediaTransport::Tcp`] client: one task per
//! server address str0m sends to, framing every packet by RFC 4571.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// ICE-TCP connections of a [`MediaTransport::Tcp`] client, one per
/// server address str0m sends to, each a task.
pub(crate) struct TcpLinks {
    /// Server address -> frames to write there.
    pub(crate) conns: HashMap<SocketAddr, mpsc::UnboundedSender<Vec<u8>>>,
    /// Where the tasks deliver received frames (with the server address).
    pub(crate) inbound: mpsc::UnboundedSender<(SocketAddr, Vec<u8>)>,
    pub(crate) stall: Arc<AtomicBool>,
}

impl TcpLinks {
    pub(crate) fn send(&mut self, to: SocketAddr, frame: Vec<u8>) {
        let inbound = self.inbound.clone();
        let stall = self.stall.clone();
        let tx = self.conns.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(tcp_connection(to, rx, inbound, stall));
            tx
        });
        // A failed connection loses the frame, as the network would.
        let _ = tx.send(frame);
    }
}

/// One ICE-TCP connection: connect to `to`, write `out`'s frames, deliver
/// what arrives to `inbound`; ends when either side is done.
async fn tcp_connection(
    to: SocketAddr,
    mut out: mpsc::UnboundedReceiver<Vec<u8>>,
    inbound: mpsc::UnboundedSender<(SocketAddr, Vec<u8>)>,
    stall: Arc<AtomicBool>,
) {
    let Ok(stream) = TcpStream::connect(to).await else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let (mut r, mut w) = stream.into_split();
    let reader = async move {
        let mut len = [0u8; 2];
        loop {
            if stall.load(Ordering::Relaxed) {
                return std::future::pending::<()>().await;
            }
            if r.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut frame = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if r.read_exact(&mut frame).await.is_err() || inbound.send((to, frame)).is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some(frame) = out.recv().await {
            let Ok(len) = u16::try_from(frame.len()) else {
                continue;
            };
            let mut framed = Vec::with_capacity(2 + frame.len());
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&frame);
            if w.write_all(&framed).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
}

/// The next frame from the ICE-TCP tasks; never, for a UDP client.
pub(crate) async fn recv_tcp(
    rx: &mut Option<mpsc::UnboundedReceiver<(SocketAddr, Vec<u8>)>>,
) -> Option<(SocketAddr, Vec<u8>)> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
