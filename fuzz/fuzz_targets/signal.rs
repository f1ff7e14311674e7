//! The signaling decoder: every text frame a browser (or anyone) sends to
//! `/ws` goes through `parse_client`, then room and display names through
//! their parsers. Must never panic; whatever parses must serialise back to
//! JSON that parses to the same message, and a refusal must carry a message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use signal::{ClientMessage, DisplayName, Limits, RoomName, parse_client, parse_client_with};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The default limits and a node's room-sized ones (defaults 100 x 8).
    let room = Limits::for_rooms(100, 8);
    let _ = parse_client_with(&text, &room);
    match parse_client(&text) {
        Ok(msg) => {
            if let ClientMessage::Join { room, name, .. } = &msg {
                let _ = RoomName::parse(room);
                let _ = DisplayName::parse(name);
            }
            let again = serde_json::to_string(&msg).expect("a parsed message serialises");
            assert_eq!(parse_client(&again).as_ref(), Ok(&msg), "round trip: {again}");
        }
        Err(e) => assert!(!e.message.is_empty(), "a refusal says why"),
    }
    // The name parsers see arbitrary strings too (a join's fields).
    let _ = RoomName::parse(&text);
    let _ = DisplayName::parse(&text);
});
