//! Running the host programs a build uses (apt, dpkg, kmod, mmdebstrap, tar).

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nix::sys::signal::Signal;

use crate::error::ImageError;

/// Lines of standard error kept in a [`ImageError::Command`].
const STDERR_TAIL: usize = 20;

/// Directories searched after `$PATH`: root's tools (depmod, modprobe) live
/// in sbin, which a non-login `$PATH` may lack.
const EXTRA_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// The path of `program`, from `$PATH` or the sbin directories.
pub(crate) fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// `program` found, or [`ImageError::MissingTool`] with `hint`.
pub(crate) fn require(program: &'static str, hint: &'static str) -> Result<PathBuf, ImageError> {
    find_program(program).ok_or(ImageError::MissingTool { program, hint })
}

/// Runs `program args` (in `cwd` if given) and returns its standard
/// output; a failure carries the last lines of its standard error. The
/// program gets SIGTERM if this process dies first, so a killed build does
/// not leave mmdebstrap writing into a scratch dir (mmdebstrap cleans up
/// on SIGTERM).
pub(crate) fn run(program: &Path, args: &[&str], cwd: Option<&Path>) -> Result<String, ImageError> {
    let mut cmd = Command::new(program);
    cmd.args(args).env("LC_ALL", "C.UTF-8");
    // SAFETY: the closure runs in the child between fork and exec; it only
    // makes the prctl(2) system call (async-signal-safe), allocating nothing
    // and taking no lock.
    unsafe {
        cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(io::Error::from));
    }
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let describe = || {
        std::iter::once(program.display().to_string())
            .chain(args.iter().map(|a| a.to_string()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let out: Output = cmd.output().map_err(|e| ImageError::Command {
        command: describe(),
        status: format!("cannot start: {e}"),
        stderr: String::new(),
    })?;
    if !out.status.success() {
        return Err(ImageError::Command {
            command: describe(),
            status: out.status.to_string(),
            stderr: tail(&String::from_utf8_lossy(&out.stderr), STDERR_TAIL),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }

    #[test]
    fn failure_carries_stderr() {
        let sh = find_program("sh").unwrap();
        let err = run(&sh, &["-c", "echo oops >&2; exit 3"], None).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("oops") && msg.contains('3'), "{msg}");
        assert_eq!(run(&sh, &["-c", "echo hi"], None).unwrap(), "hi\n");
    }
}
