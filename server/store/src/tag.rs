//! Snapshot tags: validation (a tag is also a directory name) and
//! generated tags.

use std::time::SystemTime;

use rand::Rng;

use crate::error::{Result, StoreError};

/// Longest tag.
pub const MAX_TAG_LEN: usize = 64;
const RANDOM_ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Checks `tag` against `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`.
///
/// The first character being a letter or digit rules out `.`, `..` and
/// hidden names (the store's own temporary directories start with a dot);
/// `/` and NUL are not in the alphabet, so a tag is always one plain path
/// component inside the store.
pub fn validate_tag(tag: &str) -> Result<()> {
    let bytes = tag.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_TAG_LEN
        && bytes[0].is_ascii_alphanumeric()
        && bytes[1..]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidTag {
            tag: tag.to_string(),
        })
    }
}

/// A fresh tag such as `snap-20250101-120000-k3x9`: the UTC time of
/// `now` and four random characters.
pub fn generate_tag(now: SystemTime) -> String {
    // "2025-01-01T12:00:00Z" -> "20250101-120000".
    let stamp: String = humantime::format_rfc3339_seconds(now)
        .to_string()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let (date, time) = stamp.split_at(8.min(stamp.len()));
    let mut rng = rand::rng();
    let suffix: String = (0..4)
        .map(|_| RANDOM_ALPHABET[rng.random_range(0..RANDOM_ALPHABET.len())] as char)
        .collect();
    format!("snap-{date}-{time}-{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn accepts_the_documented_form() {
        for ok in ["a", "0", "base", "v1.2_rc-3", "A.b", &"x".repeat(64)] {
            validate_tag(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn rejects_path_tricks_and_bad_characters() {
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            ".x.writing",
            "-x",
            "_x",
            "a/b",
            "../a",
            "a b",
            "a\0b",
            "é",
            &"x".repeat(65),
        ] {
            let err = validate_tag(bad).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
            assert!(err.to_string().contains("starting with a letter or digit"));
        }
    }

    #[test]
    fn generated_tags_are_valid() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_735_732_800); // 2025-01-01T12:00:00Z
        let tag = generate_tag(t);
        assert!(tag.starts_with("snap-20250101-120000-"), "{tag}");
        assert_eq!(tag.len(), "snap-20250101-120000-xxxx".len());
        validate_tag(&tag).unwrap();
        assert_ne!(generate_tag(t), generate_tag(t), "random suffix");
    }
}
