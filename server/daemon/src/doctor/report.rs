//! One check's result, the whole report, and its two renderings (aligned
//! human lines and one JSON object). Pure: no I/O here.
//!
//! The JSON schema (`schema_version` 1) is stable; fields are only ever
//! added. See DESIGN.md ("forkd doctor") for the field list.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

/// Version of the JSON document's layout.
pub const SCHEMA_VERSION: u32 = 1;

/// Exit code when nothing failed (warnings and skips allowed).
pub const EXIT_OK: u8 = 0;
/// Exit code when at least one check failed.
pub const EXIT_FAILED: u8 = 1;

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Works as forkd needs it.
    Ok,
    /// Works, but something is degraded or worth a look; exit code stays 0.
    Warn,
    /// forkd cannot work as intended here; the exit code becomes 1.
    Fail,
    /// Not run (asked to skip, or it depends on a check that failed).
    Skip,
}

impl Status {
    /// The fixed-width label of the human output.
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        }
    }
}

/// The result of one check.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// Stable identifier (`kvm`, `hypervisor`, ...).
    pub name: &'static str,
    /// The outcome.
    pub status: Status,
    /// One line saying what was found.
    pub finding: String,
    /// What to do about it; always present unless the status is ok.
    pub hint: Option<String>,
    /// Wall time the check took, in milliseconds.
    pub elapsed_ms: f64,
    /// Check-specific facts, machine-readable.
    pub details: Map<String, Value>,
}

impl Check {
    fn new(name: &'static str, status: Status, finding: String, hint: Option<String>) -> Check {
        Check {
            name,
            status,
            finding,
            hint,
            elapsed_ms: 0.0,
            details: Map::new(),
        }
    }

    /// A passed check.
    pub fn ok(name: &'static str, finding: impl Into<String>) -> Check {
        Check::new(name, Status::Ok, finding.into(), None)
    }

    /// A warning with what to do about it.
    pub fn warn(name: &'static str, finding: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::new(name, Status::Warn, finding.into(), Some(hint.into()))
    }

    /// A failure with what to do about it.
    pub fn fail(name: &'static str, finding: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::new(name, Status::Fail, finding.into(), Some(hint.into()))
    }

    /// A check that did not run, and why.
    pub fn skip(name: &'static str, finding: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::new(name, Status::Skip, finding.into(), Some(hint.into()))
    }

    /// Adds a detail (builder style).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Check {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    /// Records how long the check took (builder style).
    pub fn timed(mut self, elapsed: Duration) -> Check {
        self.elapsed_ms = (elapsed.as_secs_f64() * 1e5).round() / 100.0;
        self
    }
}

/// How many checks ended in each status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Checks that passed.
    pub ok: usize,
    /// Checks with a warning.
    pub warn: usize,
    /// Checks that failed.
    pub fail: usize,
    /// Checks not run.
    pub skip: usize,
}

/// Everything `forkd doctor` found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Layout version of this document ([`SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// Version of the `forkd` binary that ran the checks.
    pub forkd_version: &'static str,
    /// `fail` if any check failed, else `warn` if any warned, else `ok`.
    pub status: Status,
    /// The process exit code: [`EXIT_FAILED`] if any check failed, else
    /// [`EXIT_OK`].
    pub exit_code: u8,
    /// Counts per status.
    pub summary: Summary,
    /// The checks, in the order they ran.
    pub checks: Vec<Check>,
}

impl Report {
    /// Builds the report and its summary from the checks.
    pub fn new(checks: Vec<Check>) -> Report {
        let mut summary = Summary::default();
        for c in &checks {
            match c.status {
                Status::Ok => summary.ok += 1,
                Status::Warn => summary.warn += 1,
                Status::Fail => summary.fail += 1,
                Status::Skip => summary.skip += 1,
            }
        }
        let (status, exit_code) = if summary.fail > 0 {
            (Status::Fail, EXIT_FAILED)
        } else if summary.warn > 0 {
            (Status::Warn, EXIT_OK)
        } else {
            (Status::Ok, EXIT_OK)
        };
        Report {
            schema_version: SCHEMA_VERSION,
            forkd_version: env!("CARGO_PKG_VERSION"),
            status,
            exit_code,
            summary,
            checks,
        }
    }

    /// The JSON document, pretty-printed, with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("the report is plain data");
        s.push('\n');
        s
    }

    /// The human output: a header, one aligned line per check (hints on
    /// the line below, under the finding), and a summary line.
    pub fn to_human(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = format!("forkd doctor {}\n\n", self.forkd_version);
        for c in &self.checks {
            out += &format!(
                "{:<4}  {:<width$}  {}\n",
                c.status.label(),
                c.name,
                c.finding
            );
            if let Some(hint) = &c.hint {
                out += &format!("{:<4}  {:<width$}  hint: {}\n", "", "", hint);
            }
        }
        let s = &self.summary;
        let verdict = match self.status {
            Status::Fail => "forkd cannot work as intended here",
            Status::Warn => "forkd can run here; see the warnings",
            _ => "forkd can run here",
        };
        out += &format!(
            "\n{} ok, {} warning{}, {} failed, {} skipped: {verdict} (exit {})\n",
            s.ok,
            s.warn,
            if s.warn == 1 { "" } else { "s" },
            s.fail,
            s.skip,
            self.exit_code
        );
        out
    }
}

/// `n` bytes in binary units with one decimal (`1.5 GiB`), for findings.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        Report::new(vec![
            Check::ok("kvm", "works").with("api_version", 12),
            Check::warn("data_dir", "low", "free space"),
            Check::skip("daemon", "--no-daemon given", "drop --no-daemon"),
        ])
    }

    #[test]
    fn summary_and_exit_code() {
        let r = sample();
        assert_eq!(
            r.summary,
            Summary {
                ok: 1,
                warn: 1,
                fail: 0,
                skip: 1
            }
        );
        assert_eq!(r.status, Status::Warn);
        assert_eq!(r.exit_code, EXIT_OK);

        let r = Report::new(vec![Check::ok("a", "x"), Check::fail("b", "y", "z")]);
        assert_eq!(r.status, Status::Fail);
        assert_eq!(r.exit_code, EXIT_FAILED);

        let r = Report::new(vec![Check::ok("a", "x"), Check::skip("b", "y", "z")]);
        assert_eq!(r.status, Status::Ok);
        assert_eq!(r.exit_code, EXIT_OK);
    }

    #[test]
    fn json_schema_is_stable() {
        let v: Value = serde_json::from_str(&sample().to_json()).unwrap();
        let mut top: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        top.sort_unstable();
        assert_eq!(
            top,
            [
                "checks",
                "exit_code",
                "forkd_version",
                "schema_version",
                "status",
                "summary"
            ]
        );
        assert_eq!(v["schema_version"], 1);
        assert_eq!(v["status"], "warn");
        assert_eq!(v["exit_code"], 0);
        assert_eq!(
            v["summary"],
            serde_json::json!({"ok": 1, "warn": 1, "fail": 0, "skip": 1})
        );
        let kvm = &v["checks"][0];
        let mut keys: Vec<&str> = kvm
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["details", "elapsed_ms", "finding", "hint", "name", "status"]
        );
        assert_eq!(kvm["name"], "kvm");
        assert_eq!(kvm["status"], "ok");
        assert_eq!(kvm["hint"], Value::Null);
        assert_eq!(kvm["details"]["api_version"], 12);
        assert_eq!(v["checks"][1]["status"], "warn");
        assert_eq!(v["checks"][1]["hint"], "free space");
        assert_eq!(v["checks"][2]["status"], "skip");
    }

    #[test]
    fn human_lines_are_aligned() {
        let text = sample().to_human();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("forkd doctor "));
        assert_eq!(lines[1], "");
        assert_eq!(lines[2], "OK    kvm       works");
        assert_eq!(lines[3], "WARN  data_dir  low");
        assert_eq!(lines[4], "                hint: free space");
        assert_eq!(lines[5], "SKIP  daemon    --no-daemon given");
        assert_eq!(lines[6], "                hint: drop --no-daemon");
        assert_eq!(
            lines[8],
            "1 ok, 1 warning, 0 failed, 1 skipped: forkd can run here; see the warnings (exit 0)"
        );
    }

    #[test]
    fn bytes_are_readable() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(64 << 30), "64.0 GiB");
    }

    #[test]
    fn timing_is_rounded() {
        let c = Check::ok("a", "b").timed(Duration::from_micros(1234));
        assert_eq!(c.elapsed_ms, 1.23);
    }
}
