//! The SDP path of one participant as the media worker runs it (offer
//! munging, str0m's parser and `accept_offer`, a server offer, the answer
//! matched by mids, parsed and accepted): `sfu::sdp_round_for_fuzzing`.
//! Input: the browser's offer, a NUL byte, the browser's answer. Must never
//! panic (the worker would survive it behind its guard, but the participant
//! would be dropped and the node would count a media panic).
//! Seeds: `fuzz/seeds/sdp` (Chromium offers, simulcast and recvonly
//! m-lines included).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (offer, answer) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let offer = String::from_utf8_lossy(offer);
    let answer = String::from_utf8_lossy(answer);
    let _ = sfu::sdp_round_for_fuzzing(&offer, &answer);
});
