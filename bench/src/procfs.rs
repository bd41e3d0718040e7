//! Memory figures of a process from `/proc`.

use std::path::Path;

use anyhow::{Context, Result};

/// Resident and proportional set size of one process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemUsage {
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Proportional set size (shared pages divided among their users), KiB.
    pub pss_kib: u64,
    /// The part of PSS that is shared memory (memfd/tmpfs, such as guest
    /// RAM), KiB; 0 on kernels that do not report it.
    pub pss_shmem_kib: u64,
}

/// Reads `/proc/<pid>/smaps_rollup`.
pub fn mem_usage(pid: u32) -> Result<MemUsage> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_smaps_rollup(&text).with_context(|| format!("parsing {path}"))
}

/// Parses the `Rss:`, `Pss:` and `Pss_Shmem:` lines of an smaps_rollup.
pub fn parse_smaps_rollup(text: &str) -> Result<MemUsage> {
    let mut usage = MemUsage::default();
    let (mut rss, mut pss) = (false, false);
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let value = || -> Result<u64> {
            let num = rest.trim().trim_end_matches("kB").trim();
            num.parse()
                .with_context(|| format!("bad value in line {line:?}"))
        };
        match key {
            "Rss" => {
                usage.rss_kib = value()?;
                rss = true;
            }
            "Pss" => {
                usage.pss_kib = value()?;
                pss = true;
            }
            "Pss_Shmem" => usage.pss_shmem_kib = value()?,
            _ => {}
        }
    }
    anyhow::ensure!(rss && pss, "no Rss/Pss lines");
    Ok(usage)
}

/// Every `Name: N kB` line of `/proc/meminfo`, KiB (lines without a unit,
/// such as `HugePages_Total`, are skipped).
pub fn meminfo() -> Result<std::collections::HashMap<String, u64>> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (key, rest) = l.split_once(':')?;
            let mut parts = rest.split_whitespace();
            let value = parts.next()?.parse().ok()?;
            (parts.next() == Some("kB")).then(|| (key.to_string(), value))
        })
        .collect())
}

/// Whether a process with this pid exists and its command name starts with
/// `comm_prefix` (guards against a recycled pid).
pub fn process_alive(pid: u32, comm_prefix: &str) -> bool {
    if pid == 0 {
        return false;
    }
    let comm = Path::new("/proc").join(pid.to_string()).join("comm");
    match std::fs::read_to_string(comm) {
        Ok(name) => name.trim_end().starts_with(comm_prefix),
        Err(_) => false,
    }
}

/// The state letter of a process (`R`, `S`, `Z`, ...) from
/// `/proc/<pid>/stat`, if it exists.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain ") ".
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rollup() {
        let text = "00400000-7ffc1234 ---p 00000000 00:00 0    [rollup]\n\
                    Rss:                3456 kB\n\
                    Pss:                1234 kB\n\
                    Pss_Dirty:           100 kB\n\
                    Pss_Anon:            200 kB\n\
                    Pss_File:             34 kB\n\
                    Pss_Shmem:          1000 kB\n\
                    Shared_Clean:          0 kB\n";
        let u = parse_smaps_rollup(text).unwrap();
        assert_eq!(
            u,
            MemUsage {
                rss_kib: 3456,
                pss_kib: 1234,
                pss_shmem_kib: 1000
            }
        );
        assert!(parse_smaps_rollup("nothing: here\n").is_err());
    }

    #[test]
    fn reads_meminfo() {
        let all = meminfo().unwrap();
        assert!(all["MemTotal"] >= all["MemAvailable"]);
        assert!(all["MemAvailable"] > 0);
        assert!(!all.contains_key("HugePages_Total"));
    }

    #[test]
    fn reads_own_process() {
        let u = mem_usage(std::process::id()).unwrap();
        assert!(u.rss_kib > 0);
        assert!(matches!(process_state(std::process::id()), Some('R' | 'S')));
    }
}
