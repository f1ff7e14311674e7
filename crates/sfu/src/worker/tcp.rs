//! ICE-TCP media (RFC 6544): a passive TCP host candidate on the media
//! port, for browsers whose UDP is blocked. Every packet on a connection is
//! framed by RFC 4571 (`crate::framing`).
//!
//! **Where the I/O lives: in the worker's own `mio` loop**, as non-blocking
//! sockets next to the UDP socket (the listener under [`LISTENER`], each
//! connection under a token of its own), not in tokio tasks bridged by
//! channels. Every byte of a connection ends up in, or comes from, one
//! participant's `Rtc`, which only the worker thread touches; a task per
//! connection would add two channel hops and a `Waker` syscall per packet
//! and a second place where buffering and back-pressure have to be bounded,
//! and would not save the worker any work (it parses and encrypts either
//! way). Nothing here blocks: reads take at most [`READ_BUDGET`] bytes per
//! connection per loop turn (the rest waits for the next turn, which then
//! polls without sleeping), and writes go to a bounded per-connection
//! [`WriteQueue`]; a frame that does not fit (a slow TCP reader) is dropped
//! and counted, never waited for.
//!
//! A connection's life:
//! 1. Accepted (over `max_tcp_connections` it is closed at once, refused).
//! 2. Handshake: its first frame must be a STUN binding request whose
//!    USERNAME names a participant here by our ufrag (`Demux`), within
//!    `SfuConfig::tcp_handshake_timeout`; otherwise it is closed (refused). At most
//!    [`MAX_PER_PARTICIPANT`] connections per participant.
//! 3. Bound: the connection belongs to that participant. Its frames go to
//!    the participant's `Rtc` as `Protocol::Tcp` receives from the
//!    connection's remote address to the advertised candidate; str0m's
//!    `Transmit`s with `Protocol::Tcp` to that remote address go back framed
//!    on it (and only on a connection of the same participant).
//! 4. Closed when the peer closes it or fails, or when its participant is
//!    removed. A participant whose only path was this connection goes the
//!    way of a vanished UDP one (media silence, `io.rs`): closing one of
//!    several candidate-pair connections must not end a session that goes
//!    on over another.

use std::collections::{HashMap, HashSet};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use str0m::net::Protocol;
use tracing::{debug, warn};

use super::{Pid, Worker};
use crate::SfuMetrics;
use crate::framing::{FrameDecoder, WriteQueue};

/// The listener's token (0 and 1 are the UDP socket and the waker).
pub(super) const LISTENER: Token = Token(2);
/// Connections get tokens from here on, never reused.
const FIRST_CONNECTION: usize = 16;

/// Connections one participant may hold: a browser opens one per candidate
/// pair it checks over TCP (one per local interface, usually one).
pub(super) const MAX_PER_PARTICIPANT: usize = 8;

/// Bytes waiting to be written on one connection (length prefixes
/// included): ~0.8 s of a 2.5 Mbit/s video stream beyond the kernel's own
/// send buffer. Past it, frames are dropped: for a real-time stream a late
/// packet is worth no more than a lost one.
pub(super) const WRITE_QUEUE_BYTES: usize = 256 * 1024;

/// Bytes read from one connection per loop turn before the others get
/// their turn.
pub(super) const READ_BUDGET: usize = 64 * 1024;

/// One read's size.
const READ_CHUNK: usize = 16 * 1024;

struct Conn {
    stream: TcpStream,
    /// The remote address: the source str0m sees, the destination of its
    /// transmits.
    peer: SocketAddr,
    /// `None` until the handshake named a participant.
    pid: Option<Pid>,
    accepted_at: Instant,
    decoder: FrameDecoder,
    out: WriteQueue,
    /// Failed or finished: closed at the end of the loop turn.
    closed: bool,
}

/// The listener and every connection, owned by the worker.
pub(super) struct TcpMedia {
    listener: TcpListener,
    registry: Registry,
    conns: HashMap<Token, Conn>,
    /// Remote address of a bound connection -> its token.
    by_addr: HashMap<SocketAddr, Token>,
    next_token: usize,
    max_conns: usize,
    handshake_timeout: Duration,
    /// Connections that still had data when their read budget ran out.
    backlog: HashSet<Token>,
}

impl TcpMedia {
    /// Take `listener` (already registered under [`LISTENER`]); new
    /// connections are registered with `registry`.
    pub(super) fn new(
        listener: TcpListener,
        registry: Registry,
        max_conns: usize,
        handshake_timeout: Duration,
    ) -> TcpMedia {
        TcpMedia {
            listener,
            registry,
            conns: HashMap::new(),
            by_addr: HashMap::new(),
            next_token: FIRST_CONNECTION,
            max_conns,
            handshake_timeout,
            backlog: HashSet::new(),
        }
    }

    /// Whether a connection has unread data: poll without sleeping.
    pub(super) fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// The earliest handshake deadline.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter(|c| c.pid.is_none())
            .map(|c| c.accepted_at + self.handshake_timeout)
            .min()
    }

    /// Queue `data` as one frame to the connection of `pid` whose remote
    /// address is `to`, and write what the socket takes. False if it was
    /// dropped (no such connection of `pid`'s, or its queue is full).
    pub(super) fn send(&mut self, pid: Pid, to: SocketAddr, data: &[u8]) -> bool {
        let Some(c) = self.by_addr.get(&to).and_then(|t| self.conns.get_mut(t)) else {
            return false;
        };
        if c.pid != Some(pid) || c.closed {
            return false;
        }
        // Bytes still queued mean the socket would block: the writable
        // event flushes them (edge-triggered, so it comes).
        let was_empty = c.out.is_empty();
        if c.out.push_frame(data).is_err() {
            return false;
        }
        if was_empty && let Err(e) = c.out.flush(&mut c.stream) {
            debug!(peer = %c.peer, error = %e, "ICE-TCP write failed");
            c.closed = true;
        }
        true
    }

    fn close(&mut self, token: Token, metrics: &SfuMetrics) {
        let Some(mut c) = self.conns.remove(&token) else {
            return;
        };
        if self.by_addr.get(&c.peer) == Some(&token) {
            self.by_addr.remove(&c.peer);
        }
        self.backlog.remove(&token);
        let _ = self.registry.deregister(&mut c.stream);
        metrics
            .tcp_connections_open
            .store(self.conns.len() as u64, Ordering::Relaxed);
        debug!(peer = %c.peer, pid = ?c.pid, "ICE-TCP connection closed");
        // Dropping the stream closes the descriptor.
    }

    fn refuse(&mut self, token: Token, metrics: &SfuMetrics, why: &str) {
        if let Some(c) = self.conns.get(&token) {
            debug!(peer = %c.peer, why, "ICE-TCP connection refused");
        }
        metrics
            .tcp_connections_refused
            .fetch_add(1, Ordering::Relaxed);
        self.close(token, metrics);
    }

    /// Accept every pending connection.
    fn accept(&mut self, metrics: &SfuMetrics) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    if self.conns.len() >= self.max_conns {
                        metrics
                            .tcp_connections_refused
                            .fetch_add(1, Ordering::Relaxed);
                        debug!(%peer, "ICE-TCP connection over the limit; closed");
                        continue; // dropped: closed
                    }
                    let _ = stream.set_nodelay(true);
                    let token = Token(self.next_token);
                    self.next_token += 1;
                    if let Err(e) = self.registry.register(
                        &mut stream,
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        warn!(%peer, error = %e, "cannot register an ICE-TCP connection");
                        continue;
                    }
                    self.conns.insert(
                        token,
                        Conn {
                            stream,
                            peer,
                            pid: None,
                            accepted_at: Instant::now(),
                            decoder: FrameDecoder::default(),
                            out: WriteQueue::new(WRITE_QUEUE_BYTES),
                            closed: false,
                        },
                    );
                    metrics
                        .tcp_connections_accepted
                        .fetch_add(1, Ordering::Relaxed);
                    metrics
                        .tcp_connections_open
                        .store(self.conns.len() as u64, Ordering::Relaxed);
                    debug!(%peer, "ICE-TCP connection accepted");
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: what is pending waits for the
                    // next connection's event.
                    warn!(error = %e, "ICE-TCP accept failed");
                    break;
                }
            }
        }
    }

    /// Write what a connection's queue holds (it became writable).
    fn flush(&mut self, token: Token) {
        if let Some(c) = self.conns.get_mut(&token)
            && !c.out.is_empty()
            && let Err(e) = c.out.flush(&mut c.stream)
        {
            debug!(peer = %c.peer, error = %e, "ICE-TCP write failed");
            c.closed = true;
        }
    }
}

/// What a poll event said about a TCP token.
#[derive(Debug, Clone, Copy)]
pub(super) struct TcpEvent {
    pub token: Token,
    pub readable: bool,
    pub writable: bool,
}

impl Worker {
    /// Accept, write and read for the TCP tokens of one poll (and the
    /// connections whose reads were cut short last turn).
    pub(super) fn tcp_io(&mut self, events: &[TcpEvent]) {
        let Some(tcp) = self.tcp.as_mut() else {
            return;
        };
        let mut readable: Vec<Token> = tcp.backlog.drain().collect();
        for e in events {
            if e.token == LISTENER {
                tcp.accept(&self.metrics);
                continue;
            }
            if e.writable {
                tcp.flush(e.token);
            }
            if e.readable && !readable.contains(&e.token) {
                readable.push(e.token);
            }
        }
        for token in readable {
            self.tcp_read(token);
        }
    }

    /// Read up to [`READ_BUDGET`] bytes from one connection and handle
    /// every complete frame.
    fn tcp_read(&mut self, token: Token) {
        let mut taken = 0;
        while taken < READ_BUDGET {
            let Some(tcp) = self.tcp.as_mut() else {
                return;
            };
            let Some(c) = tcp.conns.get_mut(&token) else {
                return;
            };
            if c.closed {
                return;
            }
            match c.decoder.read_from(&mut c.stream, READ_CHUNK) {
                Ok(0) => {
                    c.closed = true;
                    return;
                }
                Ok(n) => taken += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!(peer = %c.peer, error = %e, "ICE-TCP read failed");
                    c.closed = true;
                    return;
                }
            }
            // Frames are handled with the decoder taken out, so that
            // handling one (which drives an `Rtc` and may write to this
            // very connection) can borrow the worker.
            let mut decoder = std::mem::take(&mut c.decoder);
            let (peer, mut pid) = (c.peer, c.pid);
            while let Some(frame) = decoder.next_frame() {
                match self.tcp_frame(token, peer, pid, frame) {
                    Some(p) => pid = Some(p),
                    None => return, // closed; the decoder goes with it
                }
            }
            match self.tcp.as_mut().and_then(|t| t.conns.get_mut(&token)) {
                Some(c) => c.decoder = decoder,
                None => return,
            }
        }
        if let Some(tcp) = self.tcp.as_mut() {
            tcp.backlog.insert(token);
        }
    }

    /// One frame from a connection: the handshake if it has no participant
    /// yet, then into the participant's `Rtc`. Returns the participant, or
    /// `None` if the connection was closed.
    fn tcp_frame(
        &mut self,
        token: Token,
        peer: SocketAddr,
        pid: Option<Pid>,
        frame: &[u8],
    ) -> Option<Pid> {
        let tcp = self.tcp.as_mut()?;
        let pid = match pid {
            Some(pid) => pid,
            None => {
                let Some(pid) = self.demux.binding_request_for(frame) else {
                    tcp.refuse(token, &self.metrics, "first frame names no participant");
                    return None;
                };
                let held = tcp.conns.values().filter(|c| c.pid == Some(pid)).count();
                if held >= MAX_PER_PARTICIPANT || !self.peers.contains_key(&pid) {
                    tcp.refuse(token, &self.metrics, "participant holds enough connections");
                    return None;
                }
                let c = tcp.conns.get_mut(&token)?;
                c.pid = Some(pid);
                tcp.by_addr.insert(peer, token);
                debug!(%peer, pid, "ICE-TCP connection bound");
                pid
            }
        };
        if !self.peers.contains_key(&pid) {
            // Not reached: removing a participant closes its connections.
            if let Some(tcp) = self.tcp.as_mut() {
                tcp.close(token, &self.metrics);
            }
            return None;
        }
        if !self.receive(pid, Protocol::Tcp, peer, frame) {
            self.metrics
                .tcp_frames_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
        Some(pid)
    }

    /// Close connections that failed, finished, or missed the handshake
    /// deadline.
    pub(super) fn tcp_reap(&mut self, now: Instant) {
        let Some(tcp) = self.tcp.as_mut() else {
            return;
        };
        let closed: Vec<Token> = tcp
            .conns
            .iter()
            .filter(|(_, c)| c.closed)
            .map(|(t, _)| *t)
            .collect();
        for t in closed {
            tcp.close(t, &self.metrics);
        }
        let deadline = tcp.handshake_timeout;
        let late: Vec<Token> = tcp
            .conns
            .iter()
            .filter(|(_, c)| c.pid.is_none() && now >= c.accepted_at + deadline)
            .map(|(t, _)| *t)
            .collect();
        for t in late {
            tcp.refuse(t, &self.metrics, "no STUN binding request in time");
        }
    }

    /// Close every connection of a participant that is being removed.
    pub(super) fn tcp_close_participant(&mut self, pid: Pid) {
        let Some(tcp) = self.tcp.as_mut() else {
            return;
        };
        let mine: Vec<Token> = tcp
            .conns
            .iter()
            .filter(|(_, c)| c.pid == Some(pid))
            .map(|(t, _)| *t)
            .collect();
        for t in mine {
            // Whatever str0m said last (DTLS close) goes if the socket takes it.
            tcp.flush(t);
            tcp.close(t, &self.metrics);
        }
    }
}
