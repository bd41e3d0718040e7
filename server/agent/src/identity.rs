//! The sandbox's identity: its hostname and `/run/forkd/sandbox-id`.

use std::fs;
use std::io::Write;

use crate::error::ResumeError;

/// Directory of the agent's runtime files.
pub const RUN_DIR: &str = "/run/forkd";
/// Holds the sandbox id (and a newline) in every sandbox.
pub const SANDBOX_ID_FILE: &str = "/run/forkd/sandbox-id";
/// Longest hostname Linux takes (`HOST_NAME_MAX`).
const HOST_NAME_MAX: usize = 64;

/// Checks that `id` can be a hostname and a one-line file.
pub fn validate(id: &str) -> Result<(), ResumeError> {
    let why = if id.is_empty() {
        Some("empty")
    } else if id.len() > HOST_NAME_MAX {
        Some("longer than 64 bytes")
    } else if id
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        Some("contains whitespace, a control character or '/'")
    } else {
        None
    };
    match why {
        Some(why) => Err(ResumeError::BadSandboxId {
            id: id.to_string(),
            why,
        }),
        None => Ok(()),
    }
}

/// Sets the hostname to `id`.
pub fn set_hostname(id: &str) -> Result<(), ResumeError> {
    nix::unistd::sethostname(id).map_err(|e| ResumeError::sys("setting the hostname", e))
}

/// Writes [`SANDBOX_ID_FILE`] atomically (a temporary file renamed over it).
pub fn write_sandbox_id(id: &str) -> Result<(), ResumeError> {
    let what = "writing /run/forkd/sandbox-id";
    fs::create_dir_all(RUN_DIR).map_err(|e| ResumeError::sys(what, e))?;
    let tmp = format!("{RUN_DIR}/.sandbox-id.tmp");
    let written = fs::File::create(&tmp).and_then(|mut f| writeln!(f, "{id}"));
    written
        .and_then(|()| fs::rename(&tmp, SANDBOX_ID_FILE))
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            ResumeError::sys(what, e)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate("sb-0123abc").is_ok());
        assert!(validate("").is_err());
        assert!(validate("a b").is_err());
        assert!(validate("a/b").is_err());
        assert!(validate(&"x".repeat(65)).is_err());
        assert!(validate(&"x".repeat(64)).is_ok());
    }
}
