//! Command-line flags and the `forkd.*` kernel command-line parameters.

use crate::error::AgentError;
use crate::log;

/// Default channel device.
pub const DEFAULT_CHANNEL: &str = "/dev/hvc0";
/// Default hostname.
pub const DEFAULT_HOSTNAME: &str = "forkd";

/// Where the channel to the host is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelSpec {
    /// A device (normally a virtio-console tty) to wait for and open.
    Path(String),
    /// An inherited fd used for both directions (host tests).
    Fd(i32),
}

/// The agent's flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flags {
    /// `Some(true)` for `--init`, `Some(false)` for `--no-init`; else decided by PID.
    pub init: Option<bool>,
    /// `--channel PATH` or `--channel-fd N`.
    pub channel: Option<ChannelSpec>,
}

impl Flags {
    /// Parses flags. Unknown arguments are logged and ignored: as PID 1 the
    /// kernel passes unrecognized boot parameters to init.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Flags, AgentError> {
        let mut flags = Flags::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .ok_or_else(|| AgentError::Usage(format!("{name} needs a value")))
            };
            match arg.as_str() {
                "--init" => flags.init = Some(true),
                "--no-init" => flags.init = Some(false),
                "--channel" => flags.channel = Some(ChannelSpec::Path(value("--channel")?)),
                "--channel-fd" => {
                    let v = value("--channel-fd")?;
                    let fd = v
                        .parse::<i32>()
                        .ok()
                        .filter(|fd| *fd >= 0)
                        .ok_or_else(|| AgentError::Usage(format!("--channel-fd {v:?}")))?;
                    flags.channel = Some(ChannelSpec::Fd(fd));
                }
                other => log::warn(format!("ignoring argument {other:?}")),
            }
        }
        Ok(flags)
    }
}

/// The `forkd.*` parameters of the kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    /// `forkd.hostname=NAME`.
    pub hostname: Option<String>,
    /// `forkd.channel=PATH`.
    pub channel: Option<String>,
}

impl Cmdline {
    /// Parses the text of /proc/cmdline.
    pub fn parse(text: &str) -> Cmdline {
        let mut c = Cmdline::default();
        for word in text.split_whitespace() {
            if let Some(v) = word.strip_prefix("forkd.hostname=") {
                c.hostname = Some(v.to_string()).filter(|v| !v.is_empty());
            } else if let Some(v) = word.strip_prefix("forkd.channel=") {
                c.channel = Some(v.to_string()).filter(|v| !v.is_empty());
            }
        }
        c
    }

    /// Reads /proc/cmdline; empty when it cannot be read.
    pub fn read() -> Cmdline {
        std::fs::read_to_string("/proc/cmdline")
            .map(|t| Cmdline::parse(&t))
            .unwrap_or_default()
    }
}

/// The channel to use: flag, then kernel command line, then the default.
pub fn channel_spec(flags: &Flags, cmdline: &Cmdline) -> ChannelSpec {
    flags.channel.clone().unwrap_or_else(|| {
        ChannelSpec::Path(
            cmdline
                .channel
                .clone()
                .unwrap_or_else(|| DEFAULT_CHANNEL.to_string()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags() {
        let f = Flags::parse(args(&["--no-init", "--channel-fd", "3"])).unwrap();
        assert_eq!(f.init, Some(false));
        assert_eq!(f.channel, Some(ChannelSpec::Fd(3)));
        let f = Flags::parse(args(&["--init", "--channel", "/dev/x", "quiet"])).unwrap();
        assert_eq!(f.init, Some(true));
        assert_eq!(f.channel, Some(ChannelSpec::Path("/dev/x".into())));
        assert!(Flags::parse(args(&["--channel-fd", "x"])).is_err());
        assert!(Flags::parse(args(&["--channel"])).is_err());
    }

    #[test]
    fn cmdline() {
        let c = Cmdline::parse("console=ttyS0 forkd.hostname=box1 quiet forkd.channel=/dev/hvc1\n");
        assert_eq!(c.hostname.as_deref(), Some("box1"));
        assert_eq!(c.channel.as_deref(), Some("/dev/hvc1"));
        assert_eq!(
            channel_spec(&Flags::default(), &c),
            ChannelSpec::Path("/dev/hvc1".into())
        );
        let none = Cmdline::parse("console=ttyS0");
        assert_eq!(none, Cmdline::default());
        assert_eq!(
            channel_spec(&Flags::default(), &none),
            ChannelSpec::Path(DEFAULT_CHANNEL.into())
        );
    }
}
