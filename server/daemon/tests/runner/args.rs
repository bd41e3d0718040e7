//! The libtest command line, as far as the scenario runner needs it:
//! name filters, `--skip`, `--exact`, `--list`, `-q`, `--ignored` and
//! `--bench` (there are no ignored scenarios and no benchmarks). The other
//! libtest flags cargo or a user may pass (`--nocapture`,
//! `--test-threads N`, `--color WHEN`, ...) are accepted and ignored:
//! scenarios run one at a time and print straight to the terminal.

/// libtest flags with a value (the next argument, or after `=`) that the
/// runner ignores.
const IGNORED_WITH_VALUE: &[&str] = &[
    "--test-threads",
    "--logfile",
    "--color",
    "--shuffle-seed",
    "-Z",
];

/// libtest flags without a value that the runner ignores.
const IGNORED: &[&str] = &[
    "--nocapture",
    "--show-output",
    "--include-ignored",
    "--force-run-in-process",
    "--exclude-should-panic",
    "--report-time",
    "--ensure-time",
    "--shuffle",
];

/// What the command line asks for.
#[derive(Default)]
pub struct Args {
    /// Run only scenarios whose name contains one of these (equals one,
    /// with `exact`); none: all.
    pub filters: Vec<String>,
    /// Leave out scenarios whose name contains (equals) one of these.
    pub skip: Vec<String>,
    pub exact: bool,
    /// List the selected scenarios instead of running them.
    pub list: bool,
    /// Terse output: a dot (or `F`) per scenario.
    pub quiet: bool,
    /// Only ignored tests or only benchmarks were asked for: none exist.
    pub none: bool,
    pub help: bool,
    /// Flags the runner does not know, ignored (and warned about).
    pub unknown: Vec<String>,
}

impl Args {
    /// Parses the arguments after the program name.
    pub fn parse(args: &[String]) -> Result<Args, String> {
        let mut a = Args::default();
        let (mut bench, mut test, mut ignored) = (false, false, false);
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| format!("{flag} needs a value"))
            };
            match flag {
                "--exact" => a.exact = true,
                "--list" => a.list = true,
                "-q" | "--quiet" => a.quiet = true,
                "--ignored" => ignored = true,
                "--bench" => bench = true,
                "--test" => test = true,
                "-h" | "--help" => a.help = true,
                "--skip" => a.skip.push(value()?),
                "--format" => a.quiet |= value()? == "terse",
                f if IGNORED_WITH_VALUE.contains(&f) => {
                    value()?;
                }
                f if IGNORED.contains(&f) => {}
                f if f.starts_with('-') => a.unknown.push(arg.clone()),
                _ => a.filters.push(arg.clone()),
            }
        }
        a.none = ignored || (bench && !test);
        Ok(a)
    }

    /// Whether the scenario `name` is selected.
    pub fn selects(&self, name: &str) -> bool {
        let matches = |pattern: &String| {
            if self.exact {
                name == pattern
            } else {
                name.contains(pattern.as_str())
            }
        };
        !self.none
            && (self.filters.is_empty() || self.filters.iter().any(matches))
            && !self.skip.iter().any(matches)
    }
}

/// What `--help` prints.
pub const USAGE: &str = "\
Usage: daemon_e2e [OPTIONS] [FILTERS...]

Runs the forkd end-to-end scenarios whose names contain one of FILTERS
(all without any), one after the other.

Options:
    --exact         FILTERS and --skip match whole names only
    --skip FILTER   leave out scenarios matching FILTER (repeatable)
    --list          list the selected scenarios (`name: test`)
    -q, --quiet     a dot per scenario instead of a line
    --ignored       run ignored scenarios only (there are none)
    -h, --help      this text

Other libtest flags (--nocapture, --test-threads N, --color WHEN, ...)
are accepted and ignored.
";
