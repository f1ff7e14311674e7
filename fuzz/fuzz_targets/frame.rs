//! Control-stream frames: the decoder, and a node fed the decoded bytes both
//! before and after a valid Hello. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trunk::proto::wire::{self, Message, PROTOCOL_VERSION};
use trunk::proto::{Config, ConnId, Incarnation, Node, NodeId, Time};

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode_frame(data);
    let _ = wire::decode_body(data);

    // A node on a fresh connection, then after the peer's Hello.
    let mut node = Node::new(Config::new(NodeId(1), "fuzz"), 7);
    let conn = ConnId(1);
    node.handle_connected(conn, None, Time(0));
    let mut buf = data;
    let mut t = 1;
    // First frame as-is (pre-handshake), then a valid Hello, then the rest.
    if let Ok(Some((body, used))) = wire::split_frame(buf) {
        node.handle_frame(conn, body, Time(t));
        buf = &buf[used..];
    }
    node.handle_connected(ConnId(2), None, Time(t));
    let hello = Message::Hello {
        node_id: NodeId(2),
        incarnation: Incarnation(5),
        version: PROTOCOL_VERSION,
        cluster: "fuzz".into(),
    };
    if let Ok(frame) = wire::encode_frame(&hello) {
        node.handle_frame(ConnId(2), &frame[wire::LEN_PREFIX..], Time(t));
    }
    while let Ok(Some((body, used))) = wire::split_frame(buf) {
        t += 1000;
        node.handle_frame(ConnId(2), body, Time(t));
        node.handle_timeout(Time(t));
        buf = &buf[used..];
    }
    let _ = node.handle_datagram(ConnId(2), buf);
    while node.poll_transmit().is_some() {}
    while node.poll_event().is_some() {}
    let _ = node.check_structure();
});
