//! Request validation at the edge: pure functions that either return the
//! value to use or an INVALID_ARGUMENT error saying what to fix.

use std::collections::HashMap;

use crate::api::error::ApiError;
use crate::api::public::quoted;

/// Most sandboxes one SpawnSandboxes call may ask for.
pub const MAX_SPAWN: u32 = 1000;
/// Guest RAM used when the request says 0.
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// Largest guest RAM accepted.
pub const MAX_MEMORY_MIB: u32 = 65536;
/// vCPUs used when the request says 0.
pub const DEFAULT_VCPUS: u32 = 2;
/// Most vCPUs accepted (the reference guest's limit).
pub const MAX_VCPUS: u32 = forkd_guest_abi::MAX_VCPUS as u32;
/// Most labels on one sandbox.
pub const MAX_LABELS: usize = 64;
/// Largest argv, counting one NUL terminator per argument (the guest's
/// request buffer holds NUL-separated arguments).
pub const MAX_ARGV_BYTES: usize = 60_000;

/// Largest Exec `stdin`, bytes.
pub const MAX_STDIN_BYTES: usize = 1 << 20;

/// Longest sandbox id accepted (real ones are 13 bytes); longer ones are
/// refused without being echoed.
pub const MAX_ID_BYTES: usize = 64;

fn invalid(msg: String) -> ApiError {
    ApiError::InvalidArgument(msg)
}

/// Checks `n` of SpawnSandboxes.
pub fn spawn_count(n: u32) -> Result<usize, ApiError> {
    if (1..=MAX_SPAWN).contains(&n) {
        Ok(n as usize)
    } else {
        Err(invalid(format!(
            "n must be between 1 and {MAX_SPAWN}, got {n}"
        )))
    }
}

/// Checks `huge_pages` on a cold boot: the reference guest only, and RAM
/// a whole number of 2 MiB pages.
pub fn huge_pages(memory_mib: u32, image: &str) -> Result<(), ApiError> {
    if !image.is_empty() {
        return Err(invalid(format!(
            "huge_pages is not available for Linux images yet (image {image:?}): leave it \
             false, or spawn the reference guest"
        )));
    }
    if !memory_mib.is_multiple_of(2) {
        return Err(invalid(format!(
            "memory_mib must be even with huge_pages (RAM is whole 2 MiB pages), got \
             {memory_mib}"
        )));
    }
    Ok(())
}

/// Resolves `memory_mib` (0 means the default).
pub fn memory_mib(m: u32) -> Result<u32, ApiError> {
    let min = forkd_guest_abi::MIN_MEMORY_MIB;
    match m {
        0 => Ok(DEFAULT_MEMORY_MIB),
        m if (min..=MAX_MEMORY_MIB).contains(&m) => Ok(m),
        m => Err(invalid(format!(
            "memory_mib must be 0 (meaning {DEFAULT_MEMORY_MIB}) or between {min} and \
             {MAX_MEMORY_MIB}, got {m}"
        ))),
    }
}

/// Resolves `vcpus` (0 means the default).
pub fn vcpus(v: u32) -> Result<u32, ApiError> {
    match v {
        0 => Ok(DEFAULT_VCPUS),
        v if (1..=MAX_VCPUS).contains(&v) => Ok(v),
        v => Err(invalid(format!(
            "vcpus must be 0 (meaning {DEFAULT_VCPUS}) or between 1 and {MAX_VCPUS}, got {v}"
        ))),
    }
}

fn is_label_key(key: &str) -> bool {
    let bytes = key.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && bytes[1..]
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn is_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Checks the labels of a spawn request.
pub fn labels(labels: &HashMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(invalid(format!(
            "at most {MAX_LABELS} labels are allowed, got {}",
            labels.len()
        )));
    }
    // Sorted, so the error names the same key every time.
    let mut keys: Vec<&String> = labels.keys().collect();
    keys.sort();
    for key in keys {
        if !is_label_key(key) {
            return Err(invalid(format!(
                "label key {} is invalid: keys are 1-63 characters of lowercase letters, digits, \
                 '.', '_' or '-', starting with a lowercase letter",
                quoted(key)
            )));
        }
        if !is_label_value(&labels[key]) {
            return Err(invalid(format!(
                "value of label {} is invalid: values are 0-63 characters of letters, digits, \
                 '.', '_' or '-'",
                quoted(key)
            )));
        }
    }
    Ok(())
}

/// Whether every pair of `selector` is present in `labels`.
pub fn labels_match(labels: &HashMap<String, String>, selector: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Checks a snapshot tag (the store's rule: a tag is also a directory
/// name).
pub fn snapshot_tag(tag: &str) -> Result<(), ApiError> {
    forkd_store::validate_tag(tag).map_err(ApiError::from)
}

/// The guest shape of children forked from `m`: `memory_mib` and `vcpus`
/// must be 0 or the snapshot's own, and `huge_pages` false or the
/// snapshot's.
pub fn fork_shape(
    m: &forkd_store::Manifest,
    memory_mib: u32,
    vcpus: u32,
    huge_pages: bool,
) -> Result<(u32, u32), ApiError> {
    let tag = &m.tag;
    let g = m.guest;
    if huge_pages && !g.huge_pages {
        return Err(invalid(format!(
            "huge_pages must be false when forking snapshot {tag}: its RAM is 4 KiB pages, and \
             children use their snapshot's page size (take the snapshot of a sandbox spawned \
             with huge_pages)"
        )));
    }
    if memory_mib != 0 && memory_mib != g.memory_mib {
        return Err(invalid(format!(
            "memory_mib must be 0 or {} (the guest RAM of snapshot {tag}) when forking, got \
             {memory_mib}",
            g.memory_mib
        )));
    }
    if vcpus != 0 && vcpus != g.vcpus {
        return Err(invalid(format!(
            "vcpus must be 0 or {} (the vCPUs of snapshot {tag}) when forking, got {vcpus}",
            g.vcpus
        )));
    }
    Ok((g.memory_mib, g.vcpus))
}

/// Checks a sandbox id field (`field` names it in the message).
pub fn sandbox_id<'a>(field: &str, id: &'a str) -> Result<&'a str, ApiError> {
    if id.is_empty() {
        Err(invalid(format!("{field} must not be empty")))
    } else if id.len() > MAX_ID_BYTES {
        Err(invalid(format!(
            "{field} is {} bytes long; sandbox ids are like sb-3k9x2m7q4d",
            id.len()
        )))
    } else {
        Ok(id)
    }
}

/// Checks an Exec argv.
pub fn argv(argv: &[String]) -> Result<(), ApiError> {
    if argv.is_empty() {
        return Err(invalid(
            "argv must not be empty: argv[0] names the guest builtin (try [\"help\"])".into(),
        ));
    }
    if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
        return Err(invalid(format!("argv[{i}] contains a NUL byte")));
    }
    let total: usize = argv.iter().map(|a| a.len() + 1).sum();
    if total > MAX_ARGV_BYTES {
        return Err(invalid(format!(
            "argv is {total} bytes (counting one NUL per argument); the limit is {MAX_ARGV_BYTES}"
        )));
    }
    Ok(())
}

/// Checks an Exec `env` and returns it sorted by key (the order the
/// guest gets it in).
pub fn exec_env(env: &HashMap<String, String>) -> Result<Vec<(String, String)>, ApiError> {
    let mut pairs: Vec<(String, String)> =
        env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    pairs.sort();
    for (key, value) in &pairs {
        if key.is_empty() {
            return Err(invalid(
                "env keys must not be empty: give each variable a name".into(),
            ));
        }
        if key.contains('=') || key.contains('\0') {
            return Err(invalid(format!(
                "env key {} is invalid: keys must not contain '=' or NUL characters",
                quoted(key)
            )));
        }
        if value.contains('\0') {
            return Err(invalid(format!(
                "value of env variable {} contains a NUL character; remove it",
                quoted(key)
            )));
        }
    }
    Ok(pairs)
}

/// Checks an Exec `cwd`: empty (meaning `/`) or an absolute path without
/// NUL characters.
pub fn exec_cwd(cwd: &str) -> Result<Option<String>, ApiError> {
    if cwd.is_empty() {
        return Ok(None);
    }
    if !cwd.starts_with('/') {
        return Err(invalid(format!(
            "cwd {} is not absolute: give a path starting with '/', or leave it empty for '/'",
            quoted(cwd)
        )));
    }
    if cwd.contains('\0') {
        return Err(invalid("cwd contains a NUL character; remove it".into()));
    }
    Ok(Some(cwd.to_string()))
}

/// Longest guest path a file request takes, in bytes (Linux's PATH_MAX).
pub const MAX_GUEST_PATH_BYTES: usize = 4096;

/// Checks a guest path of a file request (`field` names it): non-empty,
/// absolute, without NUL, at most [`MAX_GUEST_PATH_BYTES`].
pub fn guest_path(field: &str, path: &str) -> Result<String, ApiError> {
    if path.is_empty() {
        return Err(invalid(format!(
            "{field} is empty; give an absolute path in the guest, e.g. /root/data.csv"
        )));
    }
    if !path.starts_with('/') {
        return Err(invalid(format!(
            "{field} {} is not absolute; give a path starting with '/'",
            quoted(path)
        )));
    }
    if path.contains('\0') {
        return Err(invalid(format!(
            "{field} contains a NUL character; remove it"
        )));
    }
    if path.len() > MAX_GUEST_PATH_BYTES {
        return Err(invalid(format!(
            "{field} is {} bytes long; the limit is {MAX_GUEST_PATH_BYTES}",
            path.len()
        )));
    }
    Ok(path.to_string())
}

/// Checks the size of an Exec `stdin`.
pub fn exec_stdin(stdin: &[u8]) -> Result<(), ApiError> {
    if stdin.len() > MAX_STDIN_BYTES {
        return Err(invalid(format!(
            "stdin is {} bytes; the limit is {MAX_STDIN_BYTES} (1 MiB)",
            stdin.len()
        )));
    }
    Ok(())
}

/// Resolves ReadConsole's `tail_bytes` (0 means the default).
pub fn tail_bytes(n: u32) -> Result<usize, ApiError> {
    use crate::sandbox::console::{DEFAULT_TAIL_BYTES, MAX_TAIL_BYTES};
    match n {
        0 => Ok(DEFAULT_TAIL_BYTES as usize),
        n if n <= MAX_TAIL_BYTES => Ok(n as usize),
        n => Err(invalid(format!(
            "tail_bytes must be 0 (meaning {DEFAULT_TAIL_BYTES}) or at most {MAX_TAIL_BYTES} \
             (1 MiB), got {n}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn msg(err: ApiError) -> String {
        assert_eq!(err.code(), Code::InvalidArgument);
        err.to_string()
    }

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn spawn_count_bounds() {
        assert_eq!(
            msg(spawn_count(0).unwrap_err()),
            "n must be between 1 and 1000, got 0"
        );
        assert_eq!(spawn_count(1).unwrap(), 1);
        assert_eq!(spawn_count(1000).unwrap(), 1000);
        assert!(spawn_count(1001).is_err());
    }

    #[test]
    fn memory_defaults_and_bounds() {
        assert_eq!(memory_mib(0).unwrap(), 256);
        let min = forkd_guest_abi::MIN_MEMORY_MIB;
        assert_eq!(memory_mib(min).unwrap(), min);
        assert_eq!(memory_mib(65536).unwrap(), 65536);
        assert!(msg(memory_mib(min - 1).unwrap_err()).contains("memory_mib"));
        assert!(memory_mib(65537).is_err());
    }

    #[test]
    fn vcpus_defaults_and_bounds() {
        assert_eq!(vcpus(0).unwrap(), 2);
        assert_eq!(vcpus(1).unwrap(), 1);
        assert_eq!(vcpus(8).unwrap(), 8);
        assert!(msg(vcpus(9).unwrap_err()).contains("got 9"));
    }

    #[test]
    fn label_rules() {
        assert!(labels(&map(&[("team", "a-b_c.1"), ("x9.-_", "")])).is_ok());
        let long_key = format!("a{}", "b".repeat(62));
        assert!(labels(&map(&[(&long_key, "v")])).is_ok());
        let too_long_key = format!("a{}", "b".repeat(63));
        assert!(labels(&map(&[(&too_long_key, "v")])).is_err());
        for bad in ["", "Team", "1abc", "a b", "a/b", "é"] {
            let m = msg(labels(&map(&[(bad, "v")])).unwrap_err());
            assert!(m.contains(&format!("{bad:?}")), "{m}");
        }
        let m = msg(labels(&map(&[("ok", "no spaces")])).unwrap_err());
        assert!(m.contains("value of label \"ok\""), "{m}");
        assert!(labels(&map(&[("ok", &"v".repeat(64))])).is_err());
        let many: HashMap<String, String> =
            (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(msg(labels(&many).unwrap_err()).contains("at most 64"));
    }

    #[test]
    fn selector_matching() {
        let l = map(&[("a", "1"), ("b", "2")]);
        assert!(labels_match(&l, &map(&[])));
        assert!(labels_match(&l, &map(&[("a", "1")])));
        assert!(labels_match(&l, &map(&[("a", "1"), ("b", "2")])));
        assert!(!labels_match(&l, &map(&[("a", "2")])));
        assert!(!labels_match(&l, &map(&[("a", "1"), ("c", "")])));
    }

    #[test]
    fn tag_rules() {
        assert!(snapshot_tag("base").is_ok());
        assert!(snapshot_tag("0.v_1-x").is_ok());
        assert!(snapshot_tag(&"a".repeat(64)).is_ok());
        for bad in ["", "-x", ".x", "a b", &"a".repeat(65)] {
            assert!(snapshot_tag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fork_shape_must_match_the_snapshot() {
        let mut m: forkd_store::Manifest = serde_json::from_str(
            r#"{"format_version":1,"tag":"base","mode":"full","status":"ready",
                "memory_bytes":536870912,"disk_bytes":0,"data_bytes":0,"dirty_pages":0,
                "chunk_size":4194304,"created_at":"2025-01-01T00:00:00.000000Z",
                "source_sandbox":"sb-1","guest":{"memory_mib":512,"vcpus":2},"pause_us":0}"#,
        )
        .unwrap();
        assert_eq!(fork_shape(&m, 0, 0, false).unwrap(), (512, 2));
        assert_eq!(fork_shape(&m, 512, 2, false).unwrap(), (512, 2));
        assert!(msg(fork_shape(&m, 256, 0, false).unwrap_err())
            .contains("memory_mib must be 0 or 512 (the guest RAM of snapshot base)"));
        assert!(msg(fork_shape(&m, 0, 1, false).unwrap_err()).contains("vcpus must be 0 or 2"));
        m.guest.vcpus = 1;
        assert_eq!(fork_shape(&m, 0, 1, false).unwrap(), (512, 1));
        assert!(msg(fork_shape(&m, 0, 0, true).unwrap_err())
            .contains("huge_pages must be false when forking snapshot base"));
        m.guest.huge_pages = true;
        assert_eq!(fork_shape(&m, 0, 0, true).unwrap(), (512, 1));
        assert_eq!(fork_shape(&m, 0, 0, false).unwrap(), (512, 1));
    }

    #[test]
    fn huge_pages_rules() {
        assert!(huge_pages(512, "").is_ok());
        assert!(msg(huge_pages(511, "").unwrap_err()).contains("memory_mib must be even"));
        assert!(msg(huge_pages(512, "debian-python").unwrap_err())
            .contains("not available for Linux images"));
    }

    #[test]
    fn argv_rules() {
        assert!(msg(argv(&[]).unwrap_err()).contains("argv must not be empty"));
        assert!(argv(&["echo".into(), "hi".into()]).is_ok());
        assert!(msg(argv(&["echo".into(), "a\0b".into()]).unwrap_err()).contains("argv[1]"));
        // 59999 bytes + NUL fits exactly.
        assert!(argv(&["x".repeat(MAX_ARGV_BYTES - 1)]).is_ok());
        assert!(msg(argv(&["x".repeat(MAX_ARGV_BYTES)]).unwrap_err()).contains("60000"));
    }

    #[test]
    fn exec_env_rules() {
        let env = exec_env(&map(&[("B", "2"), ("A", "x=1")])).unwrap();
        assert_eq!(
            env,
            vec![("A".into(), "x=1".into()), ("B".into(), "2".into())]
        );
        assert!(msg(exec_env(&map(&[("", "v")])).unwrap_err()).contains("must not be empty"));
        assert!(msg(exec_env(&map(&[("A=B", "v")])).unwrap_err()).contains("\"A=B\""));
        assert!(msg(exec_env(&map(&[("A\0", "v")])).unwrap_err()).contains("NUL"));
        assert!(msg(exec_env(&map(&[("A", "v\0")])).unwrap_err()).contains("value of env"));
    }

    #[test]
    fn exec_cwd_rules() {
        assert_eq!(exec_cwd("").unwrap(), None);
        assert_eq!(exec_cwd("/tmp").unwrap().as_deref(), Some("/tmp"));
        assert!(msg(exec_cwd("tmp").unwrap_err()).contains("not absolute"));
        assert!(msg(exec_cwd("/t\0").unwrap_err()).contains("NUL"));
    }

    #[test]
    fn stdin_and_tail_bounds() {
        exec_stdin(&vec![0; MAX_STDIN_BYTES]).unwrap();
        assert!(msg(exec_stdin(&vec![0; MAX_STDIN_BYTES + 1]).unwrap_err()).contains("1 MiB"));
        assert_eq!(tail_bytes(0).unwrap(), 65536);
        assert_eq!(tail_bytes(1 << 20).unwrap(), 1 << 20);
        assert!(msg(tail_bytes((1 << 20) + 1).unwrap_err()).contains("tail_bytes"));
    }

    #[test]
    fn empty_id_is_invalid() {
        assert!(msg(sandbox_id("id", "").unwrap_err()).contains("id must not be empty"));
        assert_eq!(sandbox_id("id", "sb-1").unwrap(), "sb-1");
    }
}
