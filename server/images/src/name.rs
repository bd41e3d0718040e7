//! Image names.

use crate::error::ImageError;

/// The image `forkd image build` builds and sandboxes use when none is named.
pub const DEFAULT_IMAGE: &str = "debian-python";

/// Longest image name, in bytes.
const MAX_LEN: usize = 63;

/// Checks that `name` matches `[a-z0-9][a-z0-9._-]{0,62}`: a name can never
/// start with `.` (scratch directories of the store do) or hold a `/`.
pub fn validate_name(name: &str) -> Result<(), ImageError> {
    let bad = |reason| {
        Err(ImageError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    let Some(first) = name.bytes().next() else {
        return bad("it is empty");
    };
    if name.len() > MAX_LEN {
        return bad("it is longer than 63 characters");
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return bad("it must start with a lowercase letter or a digit");
    }
    let ok =
        |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-');
    if !name.bytes().all(ok) {
        return bad("it may hold only lowercase letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_good_names() {
        for n in ["debian-python", "a", "0", "x.y_z-1", &"a".repeat(63)] {
            validate_name(n).unwrap();
        }
    }

    #[test]
    fn rejects_bad_names() {
        for n in [
            "",
            ".hidden",
            "-x",
            "_x",
            "Upper",
            "a/b",
            "..",
            "a b",
            "é",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(validate_name(n), Err(ImageError::InvalidName { .. })),
                "{n:?} accepted"
            );
        }
    }
}
