//! Line scanners over SDP text, for what str0m's SDP API does not offer:
//! taking simulcast out of a browser's offer, making a client's own
//! `recvonly` m-lines `inactive`, refusing a payload type that means two
//! codecs (str0m panics on it), and telling which offer an answer belongs
//! to. They scan lines and never parse: str0m parses the SDP itself. Each
//! runs on network input before str0m sees it, so each is in the `sdp`
//! fuzz target (`negotiation::sdp_round_for_fuzzing`).

use std::borrow::Cow;
use std::collections::HashMap;

/// The offer with its simulcast attributes (`a=simulcast`, `a=rid`)
/// removed. Simulcast is not supported yet: accepted, every layer of a
/// Chromium publisher with three `sendEncodings` fed one rewriter that took
/// each SSRC change for a source switch (measured: ~19 of 30 frames/s at
/// the viewer, resolution varying from run to run). Answered without
/// simulcast, the browser sends its first encoding only (RFC 8853 §5.3: no
/// simulcast in the answer means one stream). Borrowed when there is
/// nothing to remove.
pub(super) fn without_simulcast(sdp: &str) -> Cow<'_, str> {
    let layered = |l: &str| l.starts_with("a=simulcast:") || l.starts_with("a=rid:");
    if !sdp.lines().any(layered) {
        return Cow::Borrowed(sdp);
    }
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        if !layered(line) {
            out.push_str(line);
        }
    }
    Cow::Owned(out)
}

/// The offer with every `recvonly` m-line that is not one of our
/// forwarding m-lines (`ours(mid)`) made `inactive`. A client that offers
/// to receive (aiortc's `addTransceiver("video", direction="recvonly")`)
/// got those m-lines answered `sendonly` with an msid that matched no
/// track, and nothing ever came on them: media comes on the m-lines the
/// server offers, one per track, so those are answered `inactive` instead
/// (the client sees at once that nothing will arrive there). The browser's
/// own re-offers list our m-lines as `recvonly` too: those are left alone.
pub(super) fn unknown_recvonly_inactive<'a>(
    sdp: &'a str,
    ours: impl Fn(&str) -> bool,
) -> Cow<'a, str> {
    if !sdp.lines().any(|l| l.trim_end() == "a=recvonly") {
        return Cow::Borrowed(sdp);
    }
    let mut out = String::with_capacity(sdp.len());
    // One m-section at a time: its mid may come after its direction.
    let mut section: Vec<&str> = Vec::new();
    let flush = |section: &mut Vec<&str>, out: &mut String| {
        let mid = section
            .iter()
            .find_map(|l| l.trim_end().strip_prefix("a=mid:"));
        let foreign =
            section.first().is_some_and(|l| l.starts_with("m=")) && !mid.is_some_and(&ours);
        for line in section.drain(..) {
            if foreign && line.trim_end() == "a=recvonly" {
                out.push_str("a=inactive");
                out.push_str(&line[line.trim_end().len()..]);
            } else {
                out.push_str(line);
            }
        }
    };
    for line in sdp.split_inclusive('\n') {
        if line.starts_with("m=") {
            flush(&mut section, &mut out);
        }
        section.push(line);
    }
    flush(&mut section, &mut out);
    Cow::Owned(out)
}

/// A payload type that two m-lines map to different codecs (`a=rtpmap`)
/// or parameters (`a=fmtp`), if any. Bundled m-lines must agree (RFC 8843
/// §7.3, one RTP session), and str0m asserts they do: an offer breaking it
/// made `accept_offer` panic ("Pt locked multiple times"; found by the
/// `sdp` fuzz target), which cost the participant its session as `error
/// internal` and counted a media panic. Refused as `invalid_sdp` instead.
pub(super) fn payload_type_conflict(sdp: &str) -> Option<String> {
    type Codec<'a> = (Option<&'a str>, Option<&'a str>); // (rtpmap, fmtp)
    // pt -> its codec in each m-section, in order.
    let mut sections: Vec<HashMap<&str, Codec>> = vec![HashMap::new()];
    for line in sdp.lines() {
        let line = line.trim_end();
        if line.starts_with("m=") {
            sections.push(HashMap::new());
        } else if let Some(rest) = line.strip_prefix("a=rtpmap:") {
            let (pt, v) = rest.split_once(' ').unwrap_or((rest, ""));
            sections.last_mut()?.entry(pt).or_default().0 = Some(v);
        } else if let Some(rest) = line.strip_prefix("a=fmtp:") {
            let (pt, v) = rest.split_once(' ').unwrap_or((rest, ""));
            sections.last_mut()?.entry(pt).or_default().1 = Some(v);
        }
    }
    let mut first: HashMap<&str, Codec> = HashMap::new();
    for section in sections {
        for (pt, codec) in section {
            if *first.entry(pt).or_insert(codec) != codec {
                return Some(format!(
                    "payload type {pt} means different codecs in two m-lines"
                ));
            }
        }
    }
    None
}

/// The mid of every m-line of an SDP, in order (`""` for an m-line without
/// one). Offer and answer must list the same (RFC 8829 §5.3.1), so this
/// tells which offer an answer belongs to. A line scan, not a parser: str0m
/// parses the SDP itself; this only compares.
pub(super) fn sdp_mids(sdp: &str) -> Vec<String> {
    let mut mids: Vec<String> = Vec::new();
    for line in sdp.lines() {
        let line = line.trim_end();
        if line.starts_with("m=") {
            mids.push(String::new());
        } else if let (Some(mid), Some(last)) = (line.strip_prefix("a=mid:"), mids.last_mut()) {
            *last = mid.to_owned();
        }
    }
    mids
}

/// Could an answer with m-lines `answer` belong to the offer with `offer`?
/// Same number of m-lines, and each mid the answer names is the offer's
/// there (an answer that leaves a rejected m-line without its mid is not
/// held against it).
pub(super) fn answers(answer: &[String], offer: &[String]) -> bool {
    answer.len() == offer.len()
        && answer
            .iter()
            .zip(offer)
            .all(|(a, o)| a.is_empty() || a == o)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n\
        m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:0\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\n";

    #[test]
    fn answers_are_matched_to_their_offer_by_m_lines() {
        let offer = sdp_mids(OFFER);
        assert_eq!(offer, ["0", "1", "2"]);
        assert!(answers(&offer, &offer));
        // A rejected m-line without its mid still answers the offer.
        let lenient = sdp_mids(&OFFER.replace("a=mid:2\r\n", ""));
        assert_eq!(lenient, ["0", "1", ""]);
        assert!(answers(&lenient, &offer));
        // The previous answer (one m-line fewer), or other mids: not this offer.
        let stale = sdp_mids(OFFER.split("m=video").next().unwrap_or_default());
        assert!(!answers(&stale, &offer));
        let other = sdp_mids(&OFFER.replace("a=mid:1", "a=mid:7"));
        assert!(!answers(&other, &offer));
        assert!(sdp_mids("garbage\nno m-lines").is_empty());
    }

    #[test]
    fn simulcast_is_taken_out_of_an_offer() {
        let offer = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\n\
                     a=rid:q send\r\na=rid:h send\r\na=rid:f send\r\n\
                     a=simulcast:send q;h;f\r\na=sendonly\r\n";
        let out = without_simulcast(offer);
        assert_eq!(
            out,
            "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendonly\r\n"
        );
        let plain = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n";
        assert!(matches!(without_simulcast(plain), Cow::Borrowed(_)));
    }

    #[test]
    fn a_clients_own_recvonly_m_lines_become_inactive_ours_stay() {
        let offer = "v=0\r\n\
                     m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=recvonly\r\na=mid:0\r\n\
                     m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:3\r\na=recvonly\r\n\
                     m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\na=sendonly\r\n";
        let out = unknown_recvonly_inactive(offer, |mid| mid == "3");
        assert_eq!(
            out,
            "v=0\r\n\
             m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=inactive\r\na=mid:0\r\n\
             m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:3\r\na=recvonly\r\n\
             m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\na=sendonly\r\n"
        );
        let plain = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendrecv\r\n";
        assert!(matches!(
            unknown_recvonly_inactive(plain, |_| false),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn a_payload_type_meaning_two_codecs_is_found() {
        let ok = "m=video 9 X 96\r\na=rtpmap:96 VP8/90000\r\na=fmtp:96 x=1\r\n\
                  m=video 9 X 96\r\na=rtpmap:96 VP8/90000\r\na=fmtp:96 x=1\r\n\
                  m=audio 9 X 111\r\na=rtpmap:111 opus/48000/2\r\n";
        assert_eq!(payload_type_conflict(ok), None);
        let fmtp = ok.replacen("a=fmtp:96 x=1", "a=fmtp:96 x=2", 1);
        assert!(payload_type_conflict(&fmtp).is_some_and(|e| e.contains("96")));
        let codec = ok.replacen(
            "a=rtpmap:96 VP8/90000\r\na=fmtp:96 x=1\r\nm=audio",
            "a=rtpmap:96 VP9/90000\r\na=fmtp:96 x=1\r\nm=audio",
            1,
        );
        assert!(payload_type_conflict(&codec).is_some());
    }
}
