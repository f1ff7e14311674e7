//! Whatever a browser (or an attacker) sends, parsing returns a value or a
//! coded error and never panics; names are validated the same way.

use proptest::prelude::*;
use signal::{DisplayName, ErrorCode, RoomName, parse_client};

fn json_like() -> impl Strategy<Value = String> {
    // Mutations of valid messages reach deeper than random bytes.
    let valid = prop_oneof![
        Just(r#"{"type":"join","room":"standup","name":"Ada"}"#.to_string()),
        Just(
            r#"{"type":"offer","sdp":"v=0\r\n","tracks":[{"mid":"0","source":"camera"}]}"#
                .to_string()
        ),
        Just(r#"{"type":"chat","text":"hi"}"#.to_string()),
        Just(r#"{"type":"mute","audio":true,"video":false}"#.to_string()),
    ];
    (valid, any::<usize>(), any::<char>(), 0usize..4).prop_map(|(s, pos, c, op)| {
        let mut chars: Vec<char> = s.chars().collect();
        let i = pos % (chars.len() + 1);
        match op {
            0 => chars.insert(i, c),
            1 if i < chars.len() => {
                chars.remove(i);
            }
            2 if i < chars.len() => chars[i] = c,
            _ => chars.truncate(i),
        }
        chars.into_iter().collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_text_never_panics(s in ".*") {
        let _ = parse_client(&s);
    }

    #[test]
    fn mutated_messages_never_panic(s in json_like()) {
        if let Err(e) = parse_client(&s) {
            prop_assert!(!e.message.is_empty());
            prop_assert!(e.code != ErrorCode::Internal);
        }
    }

    #[test]
    fn names_are_validated_not_panicked(s in ".*") {
        if let Ok(r) = RoomName::parse(&s) {
            prop_assert!((1..=64).contains(&r.as_str().len()));
            prop_assert!(r.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
        }
        if let Ok(n) = DisplayName::parse(&s) {
            prop_assert!((1..=64).contains(&n.as_str().chars().count()));
            prop_assert!(!n.as_str().chars().any(char::is_control));
        }
    }
}
