//! The JSON messages carried in [`crate::KIND_JSON`] frames.

use serde::{Deserialize, Serialize};

/// A message from the host (VMM) to the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMsg {
    /// Run a command. `stdin: false` gives it /dev/null; `true` means stdin
    /// data frames for `id` follow, ended by an empty one.
    Exec {
        /// Host-chosen id, unique among running execs.
        id: u64,
        /// Program and arguments; `argv[0]` is looked up in `PATH` unless it has a `/`.
        argv: Vec<String>,
        /// Variables added to (or replacing) the agent's defaults.
        env: Vec<(String, String)>,
        /// Working directory; `/` when absent.
        cwd: Option<String>,
        /// Whether stdin data frames follow.
        stdin: bool,
    },
    /// Send `signal` to the whole process group of exec `id`.
    Kill {
        /// The exec to signal.
        id: u64,
        /// Signal number.
        signal: i32,
    },
    /// Liveness check; answered by [`GuestMsg::Pong`].
    Ping {
        /// Echoed back.
        id: u64,
    },
    /// Park the channel for a snapshot: the agent answers
    /// [`GuestMsg::Quiesced`] and then writes nothing more until
    /// [`HostMsg::Resume`], so both directions are at a frame boundary.
    Quiesce {
        /// Echoed back.
        id: u64,
    },
    /// Unpark the channel. In a child restored from a snapshot
    /// (`forked`), first make it a sandbox of its own: mix `entropy` into
    /// the kernel's pool and reseed its CRNG, step the wall clock to
    /// `unix_ns`, set the hostname and sandbox id, and kill every exec that
    /// was running at the snapshot (nothing more is reported about them).
    /// Answered by [`GuestMsg::Resumed`].
    Resume {
        /// Echoed back.
        id: u64,
        /// Whether this guest is a child restored from a snapshot.
        forked: bool,
        /// Fresh host entropy (forked only; empty otherwise).
        #[serde(default)]
        entropy: Vec<u8>,
        /// The host's wall clock, ns since the Unix epoch (0: leave it).
        #[serde(default)]
        unix_ns: u64,
        /// The child's hostname and sandbox id (forked only).
        #[serde(default)]
        sandbox_id: Option<String>,
    },
}

/// A message from the guest agent to the host (VMM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestMsg {
    /// The agent takes execs now. Sent once.
    Ready {
        /// Agent version.
        version: String,
        /// CLOCK_BOOTTIME when the agent started: the kernel's share of boot.
        kernel_us: u64,
        /// How long the agent's own setup took (mounts, modules, channel).
        init_us: u64,
    },
    /// The exec's program is running as `pid` (also its process group).
    Started {
        /// Exec id.
        id: u64,
        /// Process id in the guest.
        pid: u32,
    },
    /// The exec's process ended; follows all of its output frames.
    Exited {
        /// Exec id.
        id: u64,
        /// Exit code on a normal exit.
        code: Option<i32>,
        /// Signal number when killed by a signal.
        signal: Option<i32>,
        /// Time from start to exit.
        duration_us: u64,
    },
    /// The exec could not be started; no `Exited` follows.
    Failed {
        /// Exec id.
        id: u64,
        /// What failed and why.
        message: String,
    },
    /// Answer to [`HostMsg::Ping`].
    Pong {
        /// The ping's id.
        id: u64,
    },
    /// Answer to [`HostMsg::Quiesce`]; the last frame before the agent
    /// parks its channel.
    Quiesced {
        /// The request's id.
        id: u64,
    },
    /// Answer to [`HostMsg::Resume`]: the channel is live again.
    Resumed {
        /// The request's id.
        id: u64,
        /// Execs of the snapshot killed in a forked child.
        killed: u32,
        /// Steps of a forked resume that failed (entropy, clock, hostname);
        /// empty when all held. The host treats any as a failed child.
        #[serde(default)]
        errors: Vec<String>,
    },
    /// Agent diagnostics.
    Log {
        /// The diagnostic text.
        message: String,
    },
}
