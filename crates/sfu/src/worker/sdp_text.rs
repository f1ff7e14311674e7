//! Line scanners over SDP text, for what str0m's SDP API does not offer:
//! taking simulcast out of a browser's offer, making a client's own
//! `recvonly` m-lines `inactive`, refusing a payload type that means two
//! codecs (str0m panics on it), and telling which offer an answer belongs
//! to; and, on the server's own offers, listing on a forwarding m-line
//! only the codec its track carries (`narrow_codecs`). They scan lines and
//! never parse: str0m parses the SDP itself. Those that run on network
//! input before str0m sees it are in the `sdp` fuzz target
//! (`negotiation::sdp_round_for_fuzzing`).

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
    // One m-section at a time: its mid may come after its direction.
    let out = by_section(sdp, |section, out| {
        let mid = section
            .iter()
            .find_map(|l| l.trim_end().strip_prefix("a=mid:"));
        let foreign =
            section.first().is_some_and(|l| l.starts_with("m=")) && !mid.is_some_and(&ours);
        for line in section {
            if foreign && line.trim_end() == "a=recvonly" {
                out.push_str("a=inactive");
                out.push_str(&line[line.trim_end().len()..]);
            } else {
                out.push_str(line);
            }
        }
    });
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

/// The server's offer with each m-line named in `keep` (mid → payload
/// types) listing only those payload types: the `m=` format list and the
/// `a=rtpmap`/`a=fmtp`/`a=rtcp-fb` lines of every other one go.
///
/// Why: str0m offers every codec of its configuration on an m-line it adds
/// (for video twelve, each with RTX: 24 payload types, ~2 KB of SDP per
/// m-line), and has no API to offer fewer on one m-line. A forwarding
/// m-line only ever carries its track's codec, so the rest is dead weight
/// that every offer and answer repeats: with ~30 tracks in a room, offers
/// and answers of ~70 KB that both sides parse on every change (the churn
/// soak spent about half of the client's and a third of the server's CPU
/// in SDP parsing). Once the browser answered the narrowed list, str0m
/// keeps it for the m-line (its `remote_pts`), so later offers stay small
/// by themselves. mediasoup's consumers likewise carry only the consumed
/// codec. An m-line whose list would be empty is left as it is.
pub(super) fn narrow_codecs(sdp: &str, keep: &HashMap<String, Vec<u8>>) -> String {
    by_section(sdp, |section, out| {
        let mid = section
            .iter()
            .find_map(|l| l.trim_end().strip_prefix("a=mid:"));
        let wanted = mid.and_then(|m| keep.get(m));
        let kept: Option<Vec<&str>> = match (wanted, section.first()) {
            (Some(wanted), Some(m)) if m.starts_with("m=") => {
                let formats = m.trim_end().split(' ').skip(3);
                let kept: Vec<&str> = formats
                    .filter(|f| f.parse::<u8>().is_ok_and(|pt| wanted.contains(&pt)))
                    .collect();
                (!kept.is_empty()).then_some(kept)
            }
            _ => None,
        };
        let Some(kept) = kept else {
            section.iter().for_each(|l| out.push_str(l));
            return;
        };
        for (i, line) in section.iter().enumerate() {
            let body = line.trim_end();
            let ending = &line[body.len()..];
            if i == 0 {
                let head: Vec<&str> = body.split(' ').take(3).collect();
                out.push_str(&head.join(" "));
                for f in &kept {
                    out.push(' ');
                    out.push_str(f);
                }
                out.push_str(ending);
                continue;
            }
            let pt = ["a=rtpmap:", "a=fmtp:", "a=rtcp-fb:"]
                .iter()
                .find_map(|p| body.strip_prefix(p))
                .map(|rest| rest.split(' ').next().unwrap_or(rest));
            match pt {
                Some(pt) if pt != "*" && !kept.contains(&pt) => {}
                _ => out.push_str(line),
            }
        }
    })
}

/// `sdp` rebuilt one section at a time (the session part, then each
/// m-section with its lines, endings kept): `each` appends what a section
/// becomes.
fn by_section(sdp: &str, mut each: impl FnMut(&[&str], &mut String)) -> String {
    let mut out = String::with_capacity(sdp.len());
    let mut section: Vec<&str> = Vec::new();
    for line in sdp.split_inclusive('\n') {
        if line.starts_with("m=") && !section.is_empty() {
            each(&section, &mut out);
            section.clear();
        }
        section.push(line);
    }
    if !section.is_empty() {
        each(&section, &mut out);
    }
    out
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

    #[test]
    fn a_forwarding_m_line_lists_only_the_payload_types_kept() {
        let offer = "v=0\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=rtpmap:111 opus/48000/2\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96 97 98 99\r\na=mid:1\r\n\
            a=rtcp-fb:* nack\r\n\
            a=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 nack pli\r\n\
            a=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n\
            a=rtpmap:98 VP9/90000\r\na=fmtp:98 profile-id=0\r\na=rtcp-fb:98 nack pli\r\n\
            a=rtpmap:99 rtx/90000\r\na=fmtp:99 apt=98\r\na=ssrc:1 cname:x\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96 98\r\na=mid:2\r\na=rtpmap:96 VP8/90000\r\n";
        let keep = HashMap::from([("1".to_string(), vec![96, 97]), ("2".into(), vec![100])]);
        assert_eq!(
            narrow_codecs(offer, &keep),
            "v=0\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=rtpmap:111 opus/48000/2\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96 97\r\na=mid:1\r\n\
            a=rtcp-fb:* nack\r\n\
            a=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 nack pli\r\n\
            a=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\na=ssrc:1 cname:x\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96 98\r\na=mid:2\r\na=rtpmap:96 VP8/90000\r\n",
            "mid 2 keeps its list: none of it was to be kept"
        );
        assert_eq!(narrow_codecs("garbage\nm=x\n", &keep), "garbage\nm=x\n");
    }
}
