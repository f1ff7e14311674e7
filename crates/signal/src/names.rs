//! Validated room and display names. Anything that reaches the media plane
//! or the trunk has passed through these constructors.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("is {0} characters long; the limit is 64")]
    TooLong(usize),
    #[error("contains {0:?}; allowed are A-Z a-z 0-9 . _ -")]
    BadChar(char),
    #[error("contains a control character")]
    Control,
}

/// A room name: 1–64 characters of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(String);

impl RoomName {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        let n = s.chars().count();
        if n > Self::MAX_LEN {
            return Err(NameError::TooLong(n));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(NameError::BadChar(c));
        }
        Ok(RoomName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A display name: 1–64 Unicode characters, no control characters, trimmed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DisplayName(String);

impl DisplayName {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Result<Self, NameError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        let n = s.chars().count();
        if n > Self::MAX_LEN {
            return Err(NameError::TooLong(n));
        }
        if s.chars().any(char::is_control) {
            return Err(NameError::Control);
        }
        Ok(DisplayName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DisplayName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names() {
        assert!(RoomName::parse("standup").is_ok());
        assert!(RoomName::parse("a.b_c-D9").is_ok());
        assert!(RoomName::parse(&"x".repeat(64)).is_ok());
        assert_eq!(RoomName::parse(""), Err(NameError::Empty));
        assert_eq!(
            RoomName::parse(&"x".repeat(65)),
            Err(NameError::TooLong(65))
        );
        assert_eq!(RoomName::parse("a b"), Err(NameError::BadChar(' ')));
        assert_eq!(RoomName::parse("../etc"), Err(NameError::BadChar('/')));
        assert_eq!(RoomName::parse("café"), Err(NameError::BadChar('é')));
    }

    #[test]
    fn display_names() {
        assert_eq!(DisplayName::parse("  Zoë 🎉 ").unwrap().as_str(), "Zoë 🎉");
        assert!(DisplayName::parse(&"é".repeat(64)).is_ok());
        assert_eq!(
            DisplayName::parse(&"é".repeat(65)),
            Err(NameError::TooLong(65))
        );
        assert_eq!(DisplayName::parse("   "), Err(NameError::Empty));
        assert_eq!(DisplayName::parse("a\u{0}b"), Err(NameError::Control));
    }
}
