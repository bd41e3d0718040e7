//! Fork and exec of one command, with exec failures reported through a
//! close-on-exec error pipe.
//!
//! Everything the child needs is prepared before the fork ([`Prepared`]): in
//! a multi-threaded process the child may only make async-signal-safe calls,
//! so it allocates nothing and only calls `setsid`, `dup2`, `chdir`,
//! `execve`, `write` and `_exit`.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};

/// Default environment of every exec; the request's variables override it.
pub const DEFAULT_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
    ("TERM", "dumb"),
];

/// Which step of the child's setup failed (first byte of an error report).
const STAGE_SETUP: u8 = 1;
const STAGE_CWD: u8 = 2;
const STAGE_EXEC: u8 = 3;

/// A command ready to fork: C strings and pointer arrays built in advance.
pub struct Prepared {
    name: String,
    cwd_text: String,
    candidates: Vec<CString>,
    cwd: CString,
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
}

// SAFETY: the raw pointers point into the CStrings owned by the same value,
// which are never mutated; moving the value between threads keeps them valid.
unsafe impl Send for Prepared {}

fn cstring(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} {s:?} contains a NUL byte"))
}

/// Merges the request's variables into the defaults (later ones win).
pub fn merge_env(extra: &[(String, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = DEFAULT_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in extra {
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    env
}

/// The paths to try for `argv0`: itself if it has a `/`, else each `PATH` entry.
pub fn candidates(argv0: &str, path: &str) -> Vec<String> {
    if argv0.contains('/') {
        return vec![argv0.to_string()];
    }
    path.split(':')
        .map(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            format!("{}/{argv0}", dir.trim_end_matches('/'))
        })
        .collect()
}

impl Prepared {
    /// Validates and converts a request; the error is the `Failed` message.
    pub fn new(
        argv: &[String],
        env: &[(String, String)],
        cwd: Option<&str>,
    ) -> Result<Prepared, String> {
        let name = argv.first().ok_or("empty argv")?.clone();
        if name.is_empty() {
            return Err("empty argv[0]".into());
        }
        let env = merge_env(env);
        for (k, _) in &env {
            if k.is_empty() || k.contains('=') {
                return Err(format!("bad environment variable name {k:?}"));
            }
        }
        let path = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        let candidates = candidates(&name, path)
            .iter()
            .map(|c| cstring("program path", c))
            .collect::<Result<Vec<_>, _>>()?;
        let cwd_text = cwd.unwrap_or("/").to_string();
        let cwd = cstring("cwd", &cwd_text)?;
        let argv_c = argv
            .iter()
            .map(|a| cstring("argument", a))
            .collect::<Result<Vec<_>, _>>()?;
        let envp_c = env
            .iter()
            .map(|(k, v)| cstring("environment variable", &format!("{k}={v}")))
            .collect::<Result<Vec<_>, _>>()?;
        let argv_ptrs = argv_c
            .iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp_ptrs = envp_c
            .iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        Ok(Prepared {
            name,
            cwd_text,
            candidates,
            cwd,
            _argv: argv_c,
            _envp: envp_c,
            argv_ptrs,
            envp_ptrs,
        })
    }

    /// Turns a child's error report into the `Failed` message.
    pub fn describe(&self, stage: u8, errno: i32) -> String {
        let err = io::Error::from_raw_os_error(errno);
        match stage {
            STAGE_CWD => format!("cannot change directory to {:?}: {err}", self.cwd_text),
            STAGE_EXEC => format!("cannot run {:?}: {err}", self.name),
            _ => format!("cannot set up the process for {:?}: {err}", self.name),
        }
    }
}

/// The descriptors the child gets as stdin, stdout and stderr, and the
/// write end of its error pipe. All are close-on-exec in the agent.
pub struct ChildFds<'a> {
    /// Becomes fd 0.
    pub stdin: &'a OwnedFd,
    /// Becomes fd 1.
    pub stdout: &'a OwnedFd,
    /// Becomes fd 2.
    pub stderr: &'a OwnedFd,
    /// Close-on-exec pipe for the child's error report.
    pub error: &'a OwnedFd,
}

/// Forks; the child becomes a session (and process group) leader and execs
/// `p`. Returns the child's pid in the parent.
///
/// The child's standard fds must not be numbered 0, 1 or 2 already (the
/// agent keeps those open, so new descriptors never are).
pub fn fork_exec(p: &Prepared, fds: &ChildFds<'_>) -> io::Result<libc::pid_t> {
    let raw = [
        fds.stdin.as_raw_fd(),
        fds.stdout.as_raw_fd(),
        fds.stderr.as_raw_fd(),
    ];
    let err_fd = fds.error.as_raw_fd();
    // SAFETY: the child runs only async-signal-safe code (see child_exec)
    // and never returns into Rust code of the parent.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: we are the freshly forked child; child_exec does not return.
        unsafe { child_exec(p, raw, err_fd) }
    }
    Ok(pid)
}

/// The child's side of the fork. Never returns.
///
/// # Safety
/// Must only be called in a just-forked child: it uses only
/// async-signal-safe calls and ends with `execve` or `_exit`.
unsafe fn child_exec(p: &Prepared, fds: [libc::c_int; 3], err_fd: libc::c_int) -> ! {
    let fail = |stage: u8| -> ! {
        // SAFETY: `__errno_location` returns this thread's errno, valid for
        // the thread's life; `msg` is a local buffer of `msg.len()` bytes;
        // `write` and `_exit` are async-signal-safe.
        unsafe {
            let errno = *libc::__errno_location();
            let mut msg = [0u8; 5];
            msg[0] = stage;
            msg[1..].copy_from_slice(&errno.to_le_bytes());
            libc::write(err_fd, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    };
    // SAFETY: async-signal-safe calls only (the caller is a just-forked
    // child); the sigset is a plain C struct for which all-zeroes is a valid
    // value (and `sigemptyset` then initializes it), and `p.cwd` is a
    // NUL-terminated CString that `p` owns.
    unsafe {
        // The agent ignores SIGPIPE; ignored dispositions survive exec, so restore it.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        if libc::setsid() < 0 {
            fail(STAGE_SETUP);
        }
        for (target, fd) in fds.into_iter().enumerate() {
            if libc::dup2(fd, target as libc::c_int) < 0 {
                fail(STAGE_SETUP);
            }
        }
        if libc::chdir(p.cwd.as_ptr()) < 0 {
            fail(STAGE_CWD);
        }
    }
    // Like execvp: a missing entry moves on, a permission error is
    // remembered, any other error stops the search.
    let mut saw_eacces = false;
    for path in &p.candidates {
        // SAFETY: `path` is a NUL-terminated CString, and `argv_ptrs` and
        // `envp_ptrs` are NULL-terminated arrays of pointers into CStrings
        // that `p` owns (see `Prepared::new`); `__errno_location` is this
        // thread's errno.
        let errno = unsafe {
            libc::execve(path.as_ptr(), p.argv_ptrs.as_ptr(), p.envp_ptrs.as_ptr());
            *libc::__errno_location()
        };
        match errno {
            libc::ENOENT | libc::ENOTDIR => {}
            libc::EACCES => saw_eacces = true,
            _ => fail(STAGE_EXEC),
        }
    }
    let errno = if saw_eacces {
        libc::EACCES
    } else {
        libc::ENOENT
    };
    // SAFETY: `__errno_location` returns this thread's errno, valid for the
    // thread's life.
    unsafe { *libc::__errno_location() = errno };
    fail(STAGE_EXEC)
}

/// Waits until the child has exec'd (the pipe closes empty) or failed (it
/// reports a stage and errno); `Some((stage, errno))` on failure.
pub fn read_exec_error(read_end: OwnedFd) -> io::Result<Option<(u8, i32)>> {
    let mut f = File::from(read_end);
    let mut msg = Vec::with_capacity(5);
    f.read_to_end(&mut msg)?;
    if msg.len() < 5 {
        return Ok(None);
    }
    Ok(Some((
        msg[0],
        i32::from_le_bytes([msg[1], msg[2], msg[3], msg[4]]),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_merge_overrides_and_extends() {
        let env = merge_env(&[
            ("HOME".into(), "/home/x".into()),
            ("FOO".into(), "1".into()),
        ]);
        assert!(env.contains(&("HOME".into(), "/home/x".into())));
        assert!(env.contains(&("FOO".into(), "1".into())));
        assert_eq!(env.iter().filter(|(k, _)| k == "HOME").count(), 1);
        assert!(env.iter().any(|(k, _)| k == "PATH"));
    }

    #[test]
    fn path_candidates() {
        assert_eq!(candidates("./x", "/bin"), vec!["./x"]);
        assert_eq!(
            candidates("ls", "/usr/bin/:/bin::"),
            vec!["/usr/bin/ls", "/bin/ls", "./ls", "./ls"]
        );
    }

    #[test]
    fn prepare_rejects_bad_requests() {
        assert_eq!(Prepared::new(&[], &[], None).err().unwrap(), "empty argv");
        assert!(Prepared::new(&["a\0b".into()], &[], None).is_err());
        assert!(Prepared::new(&["ls".into()], &[("A=B".into(), "x".into())], None).is_err());
        let p = Prepared::new(&["nosuch".into()], &[], Some("/nope")).unwrap();
        assert_eq!(
            p.describe(STAGE_EXEC, libc::ENOENT),
            "cannot run \"nosuch\": No such file or directory (os error 2)"
        );
        assert!(p.describe(STAGE_CWD, libc::ENOENT).contains("\"/nope\""));
    }
}
