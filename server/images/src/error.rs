//! The error type of the crate.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong looking up, building or removing an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The name does not match `[a-z0-9][a-z0-9._-]{0,62}`.
    #[error("invalid image name {name:?}: {reason} (names match [a-z0-9][a-z0-9._-]{{0,62}})")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No image of that name is in the store.
    #[error("image {name} not found")]
    NotFound {
        /// The name looked up.
        name: String,
    },
    /// The image directory exists but its manifest or files are unusable.
    #[error("image {name} is invalid: {reason}")]
    Invalid {
        /// The image.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A file system operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done ("read", "create", ...).
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A program the build needs is not installed.
    #[error("{program} is not installed: {hint}")]
    MissingTool {
        /// The program.
        program: &'static str,
        /// How to install it.
        hint: &'static str,
    },
    /// Building images needs root.
    #[error("building an image needs root (mmdebstrap, dpkg -x and device nodes in the userland); run it as root")]
    NotRoot,
    /// The agent binary to install as /init is missing.
    #[error("agent binary {path} not found: build it with `cargo build --release -p forkd-agent` or pass --agent PATH")]
    AgentMissing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A program the build runs failed.
    #[error("{command} failed ({status}){}", tail_lines(stderr))]
    Command {
        /// The command line, for the message.
        command: String,
        /// Exit status, or why it could not start.
        status: String,
        /// Its last lines of standard error.
        stderr: String,
    },
    /// A package name that cannot be one (empty, an option, whitespace).
    #[error("bad package name {name:?}")]
    InvalidPackage {
        /// The rejected name.
        name: String,
    },
    /// Packages asked for that apt does not know.
    #[error("unknown Debian package(s): {names} (apt-cache policy knows no such package, even after apt-get update)")]
    UnknownPackages {
        /// The unknown names, comma-separated.
        names: String,
    },
    /// The kernel package could not be resolved or used.
    #[error("kernel: {0}")]
    Kernel(String),
    /// Another build holds the store's lock and it could not be waited for.
    #[error("cannot lock {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::Error,
    },
}

impl ImageError {
    /// An [`ImageError::Io`] for `action` on `path`.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}

fn tail_lines(stderr: &str) -> String {
    if stderr.trim().is_empty() {
        String::new()
    } else {
        format!(":\n{}", stderr.trim_end())
    }
}
