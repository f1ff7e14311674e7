//! The tasks around each trunk connection, apart from the core task in
//! `driver.rs`: accepting connections, reading one connection's control
//! stream and datagrams, writing its frames in order, and reading the node
//! id its certificate names.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::mpsc;
use tracing::debug;

use super::driver::{ConnHandle, DIAL_TIMEOUT, Input, QueueDrops, Write};
use super::identity::cert_node_id;
use crate::proto::wire::FrameBuffer;
use crate::proto::{CloseCode, ConnId, NodeId};

pub(super) async fn accept_loop(endpoint: Endpoint, tx: mpsc::Sender<Input>) {
    while let Some(incoming) = endpoint.accept().await {
        let tx = tx.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "trunk handshake failed");
                    let _ = tx.send(Input::HandshakeFailed).await;
                    return;
                }
            };
            // The dialer opens the control stream and speaks first (Hello).
            match tokio::time::timeout(DIAL_TIMEOUT, conn.accept_bi()).await {
                Ok(Ok((send, recv))) => {
                    let _ = tx
                        .send(Input::Connected {
                            conn,
                            send,
                            recv,
                            dialed: None,
                        })
                        .await;
                }
                _ => {
                    conn.close(
                        VarInt::from_u32(CloseCode::ProtocolError.code()),
                        b"no control stream",
                    );
                    let _ = tx.send(Input::HandshakeFailed).await;
                }
            }
        });
    }
}

/// The node id the peer's certificate names (`Ok(None)`: none).
pub(super) fn peer_node_id(conn: &Connection) -> Result<Option<NodeId>, String> {
    let certs = conn
        .peer_identity()
        .ok_or("no peer certificate")?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| "unexpected peer identity type")?;
    let leaf = certs.first().ok_or("empty peer certificate chain")?;
    cert_node_id(leaf)
}

pub(super) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Ask a connection's writer to close it; if its queue is full (the peer
/// stopped reading), close at once.
pub(super) fn close_conn(h: &ConnHandle, code: CloseCode) {
    if h.writer.try_send(Write::Close(code)).is_err() {
        h.conn.close(VarInt::from_u32(code.code()), b"");
    }
}

/// Writes frames in order; on `Close`, finishes the stream and closes the
/// connection with the code.
pub(super) async fn writer(conn: Connection, mut send: SendStream, mut rx: mpsc::Receiver<Write>) {
    while let Some(w) = rx.recv().await {
        match w {
            Write::Frame(bytes) => {
                if send.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Write::Close(code) => {
                let _ = send.finish();
                // Give the stream a moment to deliver the last frames
                // (Goodbye) before the close, which discards unsent data.
                let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
                conn.close(VarInt::from_u32(code.code()), b"");
                return;
            }
        }
    }
}

/// Reads the control stream (frames) and datagrams of one connection until
/// it ends; reports `Lost` once.
pub(super) async fn reader(
    id: ConnId,
    conn: Connection,
    mut recv: RecvStream,
    tx: mpsc::Sender<Input>,
    datagrams: mpsc::Sender<(ConnId, Bytes)>,
    drops: Arc<QueueDrops>,
) {
    let mut frames = FrameBuffer::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut stream_open = true;
    loop {
        tokio::select! {
            r = recv.read(&mut buf), if stream_open => match r {
                Ok(Some(n)) => {
                    frames.push(&buf[..n]);
                    loop {
                        match frames.next_body() {
                            Ok(Some(body)) => {
                                // Waits when the core is behind: we stop
                                // reading, QUIC flow control slows the peer.
                                if tx.send(Input::Frame(id, body.to_vec())).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                debug!(conn = id.0, error = %e, "bad frame");
                                let _ = tx.send(Input::Corrupt(id)).await;
                                return;
                            }
                        }
                    }
                }
                // The peer finished its side: nothing more will come, but
                // the connection may still carry its close.
                Ok(None) | Err(_) => stream_open = false,
            },
            d = conn.read_datagram() => match d {
                Ok(bytes) => {
                    if datagrams.try_send((id, bytes)).is_err() {
                        drops
                            .datagrams_in
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Err(_) => {
                    let _ = tx.send(Input::Lost(id)).await;
                    return;
                }
            },
        }
    }
}
