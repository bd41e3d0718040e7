//! The command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// forkd: a gRPC control plane for KVM microVM sandboxes.
#[derive(Debug, Parser)]
#[command(name = "forkd", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: serve forkd.v1 over gRPC until SIGTERM or SIGINT.
    Serve(Box<ServeArgs>),
    /// Check that this host can run forkd (KVM and its hypervisor, memfd,
    /// userfaultfd write-protect, dirty logging, forkd-vmm, the data
    /// directory) and that a daemon is healthy; exit 1 if a check failed.
    Doctor(crate::doctor::DoctorArgs),
    /// Build, list and remove guest images (a Debian kernel and an
    /// initramfs holding the userland, with forkd-agent as /init).
    Image(ImageArgs),
}

/// Options of `forkd image`.
#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// What to do with images.
    #[command(subcommand)]
    pub command: ImageCommand,
}

/// The subcommands of `forkd image`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build an image (as root): mmdebstrap'ed Debian bookworm userland,
    /// Debian's generic kernel, forkd-agent as /init. Does nothing when the
    /// image is already up to date.
    Build(ImageBuildArgs),
    /// List the images.
    Ls(ImageLsArgs),
    /// Remove images.
    Rm(ImageRmArgs),
}

/// Where images live.
#[derive(Debug, clap::Args)]
pub struct ImageStoreArgs {
    /// The daemon's data directory (as `forkd serve --data-dir`).
    #[arg(long, default_value = "/var/lib/forkd", value_name = "DIR")]
    pub data_dir: PathBuf,

    /// The image directory [default: DATA_DIR/images].
    #[arg(long, value_name = "DIR")]
    pub images_dir: Option<PathBuf>,
}

impl ImageStoreArgs {
    /// The image directory these options name.
    pub fn images_dir(&self) -> PathBuf {
        self.images_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("images"))
    }
}

/// Options of `forkd image build`.
#[derive(Debug, clap::Args)]
pub struct ImageBuildArgs {
    /// Image name ([a-z0-9][a-z0-9._-]{0,62}).
    #[arg(default_value = forkd_images::DEFAULT_IMAGE)]
    pub name: String,

    /// Debian packages to add to the essential set, comma-separated
    /// [default: python3,procps for debian-python, procps for others].
    #[arg(long, value_delimiter = ',', value_name = "P1,P2,...")]
    pub packages: Option<Vec<String>>,

    /// Where the image goes.
    #[command(flatten)]
    pub store: ImageStoreArgs,

    /// The forkd-agent binary installed as /init [default: forkd-agent
    /// next to this executable].
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,

    /// Rebuild even when the image is up to date.
    #[arg(long)]
    pub force: bool,

    /// Default guest RAM of sandboxes of this image, in MiB.
    #[arg(long, default_value_t = forkd_images::DEFAULT_MEMORY_MIB, value_name = "MIB")]
    pub memory_mib: u64,

    /// Extra kernel command-line words the image wants.
    #[arg(long, default_value = "", value_name = "ARGS")]
    pub kernel_args: String,
}

/// Options of `forkd image ls`.
#[derive(Debug, clap::Args)]
pub struct ImageLsArgs {
    /// Where the images are.
    #[command(flatten)]
    pub store: ImageStoreArgs,

    /// Print a JSON array of the images' manifests.
    #[arg(long)]
    pub json: bool,
}

/// Options of `forkd image rm`.
#[derive(Debug, clap::Args)]
pub struct ImageRmArgs {
    /// Images to remove.
    #[arg(required = true)]
    pub names: Vec<String>,

    /// Where the images are.
    #[command(flatten)]
    pub store: ImageStoreArgs,
}

/// Options of `forkd serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TCP address to serve gRPC on (h2c). A non-loopback address needs a
    /// token (--token-file or FORKD_TOKEN).
    #[arg(long, default_value = "127.0.0.1:50051", value_name = "ADDR")]
    pub listen: SocketAddr,

    /// Also serve on this Unix socket path (replaced if a stale socket is
    /// there).
    #[arg(long, value_name = "PATH")]
    pub listen_unix: Option<PathBuf>,

    /// Directory for sandbox state; holds forkd.lock, sandboxes/ and
    /// snapshots/.
    #[arg(long, default_value = "/var/lib/forkd", value_name = "DIR")]
    pub data_dir: PathBuf,

    /// The forkd-vmm binary [default: forkd-vmm next to this executable,
    /// else the one on $PATH].
    #[arg(long, value_name = "PATH")]
    pub vmm_path: Option<PathBuf>,

    /// File holding the bearer token every call but grpc.health.v1 must
    /// carry (surrounding whitespace is ignored). Without it the FORKD_TOKEN
    /// environment variable is used, if set.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Log format on stderr (the level comes from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Most sandboxes that may exist at once.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub max_sandboxes: usize,

    /// Seconds in-flight calls get to finish once the listeners stop.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub shutdown_timeout: u64,

    /// Seconds between health turning NOT_SERVING and the listeners
    /// stopping, so load balancers can move traffic away.
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    pub drain_grace: u64,

    /// Bandwidth limit of each LIVE branch's background memory copy, in
    /// MiB/s (passed to every VMM as --copy-rate-mibps); 0 means unlimited.
    /// Limits the disk bandwidth background copies take, and lengthens the
    /// window in which a LIVE snapshot is WRITING.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub live_copy_rate_mibps: u64,

    /// Keep this many standby VMMs per VM shape in use (guest RAM and
    /// vCPUs of the snapshots forked; the default sandbox shape from the
    /// start), each with its KVM VM, vCPUs and memory slot already built:
    /// a child of a reference-guest snapshot then starts on one and only
    /// maps the snapshot and loads its state. 0 (the default) turns the
    /// pool off. A standby holds no guest memory; at most 4 shapes are kept.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub vmm_pool: usize,

    /// Also serve Prometheus metrics over plain HTTP at http://ADDR/metrics
    /// (off by default). No token is checked there: bind it to a loopback or
    /// pod-internal address.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// Most guest memory, in MiB, that running and starting sandboxes may
    /// add up to; a spawn that would go past it is RESOURCE_EXHAUSTED
    /// [default: the host's MemTotal].
    #[arg(long, value_name = "MIB")]
    pub max_guest_memory_mib: Option<u64>,

    /// Seconds a VMM may go without answering the daemon's heartbeat (sent
    /// every second, answered by the VMM's control reader even during a
    /// long snapshot write or Exec) before it is declared failed and killed;
    /// 0 turns the watchdog off.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub vmm_watchdog: u64,

    /// Most connections open at once on each gRPC listener (TCP and Unix
    /// socket, counted separately). When a listener is full, its oldest
    /// connection with no call in flight is closed to make room; if every
    /// connection has a call in flight, the new one is refused.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_connections: usize,

    /// Seconds a connection may stay open with no call in flight before it
    /// is closed.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub idle_timeout: u64,

    /// Seconds a new connection gets to start its first call before it is
    /// closed (bounds half-open connections that send nothing, or only the
    /// HTTP/2 preface).
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub first_call_timeout: u64,

    /// Without a token, also accept connections from this local user id
    /// (repeatable; the daemon's own user and root are always accepted).
    /// With a token this has no effect: the token decides.
    #[arg(long, value_name = "UID")]
    pub allow_uid: Vec<u32>,

    /// Directory of the Linux images built by `forkd image build NAME` (one
    /// subdirectory per image) [default: DATA_DIR/images].
    #[arg(long, value_name = "DIR")]
    pub images_dir: Option<PathBuf>,

    /// Seconds a Linux guest gets from VMM start to answering its first
    /// ping (the reference guest gets 30).
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pub linux_boot_timeout: u64,

    /// Lifetime in seconds of a sandbox spawned without ttl_seconds: it is
    /// then deleted as DeleteSandbox deletes it; 0 means no expiry.
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    pub default_ttl: u64,

    /// Longest lifetime in seconds a SpawnSandboxes or SetSandboxTtl may
    /// ask for (a longer one is INVALID_ARGUMENT); 0 means no maximum.
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    pub max_ttl: u64,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let cli = Cli::try_parse_from(["forkd", "serve"]).unwrap();
        let Command::Serve(a) = cli.command else {
            panic!("not parsed as serve");
        };
        assert_eq!(a.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(a.data_dir, PathBuf::from("/var/lib/forkd"));
        assert_eq!(a.max_sandboxes, 4096);
        assert_eq!(a.shutdown_timeout, 30);
        assert_eq!(a.drain_grace, 0);
        assert_eq!(a.live_copy_rate_mibps, 0);
        assert_eq!(a.log_format, LogFormat::Text);
        assert_eq!(a.max_guest_memory_mib, None);
        assert_eq!(a.vmm_watchdog, 10);
        assert_eq!(a.max_connections, 1024);
        assert_eq!(a.idle_timeout, 300);
        assert_eq!(a.first_call_timeout, 10);
        assert!(a.allow_uid.is_empty());
        assert_eq!((a.images_dir, a.linux_boot_timeout), (None, 120));
        assert_eq!((a.default_ttl, a.max_ttl), (0, 0));
        assert!(a.listen_unix.is_none() && a.vmm_path.is_none() && a.token_file.is_none());
    }

    #[test]
    fn image_build_defaults_and_lists() {
        let cli = Cli::try_parse_from(["forkd", "image", "build"]).unwrap();
        let Command::Image(ImageArgs {
            command: ImageCommand::Build(b),
        }) = cli.command
        else {
            panic!("not parsed as image build");
        };
        assert_eq!(b.name, "debian-python");
        assert_eq!(b.packages, None);
        assert_eq!(b.store.images_dir(), PathBuf::from("/var/lib/forkd/images"));
        assert!(!b.force && b.agent.is_none());

        let cli = Cli::try_parse_from([
            "forkd",
            "image",
            "build",
            "x",
            "--packages",
            "a,b",
            "--data-dir",
            "/d",
        ])
        .unwrap();
        let Command::Image(ImageArgs {
            command: ImageCommand::Build(b),
        }) = cli.command
        else {
            panic!("not parsed as image build");
        };
        assert_eq!(b.packages.unwrap(), ["a", "b"]);
        assert_eq!(b.store.images_dir(), PathBuf::from("/d/images"));
        assert!(Cli::try_parse_from(["forkd", "image", "rm"]).is_err());
    }

    #[test]
    fn metrics_listen_is_off_unless_given() {
        let serve = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["forkd", "serve"], args].concat()).unwrap();
            let Command::Serve(a) = cli.command else {
                panic!("not parsed as serve");
            };
            a.metrics_listen
        };
        assert_eq!(serve(&[]), None);
        assert_eq!(
            serve(&["--metrics-listen", "127.0.0.1:9464"]),
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert!(Cli::try_parse_from(["forkd", "serve", "--metrics-listen", "nope"]).is_err());
    }
}
