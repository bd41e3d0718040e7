//! The agent's error type.

use std::io;

use forkd_agent_proto::ProtoError;

/// What went wrong in the agent, with the context of what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What the agent was doing.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The channel carried something that is not a valid frame.
    #[error("channel protocol: {0}")]
    Proto(#[from] ProtoError),
    /// The channel device did not appear in time.
    #[error("channel {path} did not appear within {secs} s")]
    ChannelTimeout {
        /// The device path waited for.
        path: String,
        /// How long the agent waited.
        secs: u64,
    },
    /// A command-line argument is malformed.
    #[error("bad argument: {0}")]
    Usage(String),
}

impl AgentError {
    /// An I/O error with context.
    pub fn io(what: impl Into<String>, source: impl Into<io::Error>) -> Self {
        AgentError::Io {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// A step of a forked resume that failed; reported to the host in
/// `Resumed.errors` as its display text.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// A forked resume came without entropy.
    #[error("no entropy in a forked resume")]
    NoEntropy,
    /// The sandbox id cannot be a hostname.
    #[error("bad sandbox id {id:?}: {why}")]
    BadSandboxId {
        /// The id as received.
        id: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Sys {
        /// The step, e.g. "reseeding the CRNG".
        what: &'static str,
        /// The underlying error.
        source: io::Error,
    },
}

impl ResumeError {
    /// A failed step.
    pub fn sys(what: &'static str, source: impl Into<io::Error>) -> Self {
        ResumeError::Sys {
            what,
            source: source.into(),
        }
    }
}
