//! The vmm_binary check: `forkd serve` would find `forkd-vmm` (same lookup:
//! `--vmm-path`, else next to this executable, else `$PATH`), it runs, and
//! its version matches this `forkd`'s.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::report::Check;
use crate::config::{resolve_vmm, VMM_BINARY};

/// Name of this check.
pub const NAME: &str = "vmm_binary";

const RUN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `path --version` with a time bound; the first line of its stdout.
fn version_of(path: &Path) -> Result<String, String> {
    let mut child = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() < RUN_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("`--version` did not exit within {RUN_TIMEOUT:?}"));
            }
            Err(e) => return Err(format!("waiting for it: {e}")),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("reading its output: {e}"))?;
    if !out.status.success() {
        return Err(format!("`--version` exited with {}", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or("").trim().to_owned())
}

/// The check; `explicit` is `--vmm-path`.
pub fn check(explicit: Option<&Path>) -> Check {
    let exe = std::env::current_exe().ok();
    let path = match resolve_vmm(
        explicit,
        exe.as_deref(),
        std::env::var_os("PATH").as_deref(),
    ) {
        Ok(path) => path,
        Err(e) => {
            return Check::fail(
                NAME,
                e.to_string(),
                format!(
                    "build it (`cargo build --release -p forkd-vmm`) and put it next to forkd \
                     or on $PATH, or pass --vmm-path to both `forkd doctor` and `forkd serve`; \
                     without {VMM_BINARY} no sandbox starts"
                ),
            )
        }
    };
    let shown = path.display().to_string();
    let ours = env!("CARGO_PKG_VERSION");
    match version_of(&path) {
        Ok(line) if line.split_whitespace().last() == Some(ours) => {
            Check::ok(NAME, format!("{shown} ({line})")).with("version", line)
        }
        Ok(line) => Check::warn(
            NAME,
            format!("{shown} reports `{line}`, but this forkd is {ours}"),
            "install forkd and forkd-vmm from the same build",
        )
        .with("version", line),
        Err(e) => Check::fail(
            NAME,
            format!("{shown}: {e}"),
            "rebuild it (`cargo build --release -p forkd-vmm`) or pass --vmm-path",
        ),
    }
    .with("path", shown)
}
