//! Sandbox ids: `sb-` followed by 10 random lowercase letters and digits.

use rand::Rng;

/// Prefix of every sandbox id.
pub const SANDBOX_PREFIX: &str = "sb-";
/// Random characters after the prefix.
pub const SANDBOX_RANDOM_LEN: usize = 10;
const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// A fresh random sandbox id, for example `sb-3k9x2m7q4d`.
pub fn new_sandbox_id() -> String {
    let mut rng = rand::rng();
    let mut id = String::with_capacity(SANDBOX_PREFIX.len() + SANDBOX_RANDOM_LEN);
    id.push_str(SANDBOX_PREFIX);
    for _ in 0..SANDBOX_RANDOM_LEN {
        id.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    id
}

/// Whether `id` has the shape of a sandbox id.
#[cfg(test)]
pub fn is_sandbox_id(id: &str) -> bool {
    id.strip_prefix(SANDBOX_PREFIX).is_some_and(|rest| {
        rest.len() == SANDBOX_RANDOM_LEN && rest.bytes().all(|b| ALPHABET.contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_documented_shape() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let id = new_sandbox_id();
            assert!(is_sandbox_id(&id), "{id}");
            assert_eq!(id.len(), 13);
            seen.insert(id);
        }
        assert_eq!(seen.len(), 1000);
        assert!(is_sandbox_id("sb-3k9x2m7q4d"));
        assert!(!is_sandbox_id("sb-3K9x2m7q4d"));
        assert!(!is_sandbox_id("sb-3k9x2m7q4"));
        assert!(!is_sandbox_id("xx-3k9x2m7q4d"));
    }
}
