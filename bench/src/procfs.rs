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

/// The default huge page pool, from `/proc/meminfo`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HugePool {
    /// `HugePages_Total`: pages in the pool.
    pub total: u64,
    /// `HugePages_Free`: pages not in use (reserved ones included).
    pub free: u64,
    /// `HugePages_Rsvd`: free pages promised to existing mappings.
    pub reserved: u64,
    /// `Hugepagesize`: the pool's page size, KiB.
    pub page_kib: u64,
}

impl HugePool {
    /// Pages in use (mapped somewhere, or held by a hugetlbfs file).
    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.free)
    }

    /// Free pages nobody has reserved: what a new mapping can take.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }
}

/// Reads the huge page pool from `/proc/meminfo`.
pub fn huge_pool() -> Result<HugePool> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    parse_huge_pool(&text).context("parsing /proc/meminfo")
}

/// The `HugePages_Total/Free/Rsvd` and `Hugepagesize` lines of a
/// `/proc/meminfo`.
pub fn parse_huge_pool(text: &str) -> Result<HugePool> {
    let field = |name: &str| -> Result<u64> {
        let line = text
            .lines()
            .find(|l| l.split_once(':').is_some_and(|(k, _)| k == name))
            .with_context(|| format!("no {name} line (a kernel without hugetlb support?)"))?;
        line.split_once(':')
            .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("bad value in line {line:?}"))
    };
    Ok(HugePool {
        total: field("HugePages_Total")?,
        free: field("HugePages_Free")?,
        reserved: field("HugePages_Rsvd")?,
        page_kib: field("Hugepagesize")?,
    })
}

/// The huge pages one mapping of a process holds, from `/proc/<pid>/smaps`
/// (hugetlb pages are not in its `Rss`/`Pss`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HugetlbVma {
    /// `DEV INODE` of the mapped file: the same in every process mapping it.
    pub file: String,
    /// `Private_Hugetlb`, KiB: its pages mapped by this process only (its
    /// copy-on-write copies, and file pages no other process maps).
    pub private_kib: u64,
    /// `Shared_Hugetlb`, KiB: its pages other processes map too.
    pub shared_kib: u64,
}

/// The mappings of `pid` that hold huge pages.
pub fn hugetlb_vmas(pid: u32) -> Result<Vec<HugetlbVma>> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_smaps_hugetlb(&text).with_context(|| format!("parsing {path}"))
}

/// The mappings of an smaps text with non-zero `Private_Hugetlb` or
/// `Shared_Hugetlb`.
pub fn parse_smaps_hugetlb(text: &str) -> Result<Vec<HugetlbVma>> {
    let mut out = Vec::new();
    let mut cur: Option<HugetlbVma> = None;
    let mut flush = |vma: Option<HugetlbVma>| {
        if let Some(v) = vma.filter(|v| v.private_kib + v.shared_kib > 0) {
            out.push(v);
        }
    };
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.split_once('-').is_some_and(|(a, b)| {
            u64::from_str_radix(a, 16).is_ok() && u64::from_str_radix(b, 16).is_ok()
        }) {
            // `START-END PERMS OFFSET DEV INODE [PATH]`
            let mut fields = words.skip(2);
            let (dev, inode) = (fields.next(), fields.next());
            let (Some(dev), Some(inode)) = (dev, inode) else {
                anyhow::bail!("bad mapping line {line:?}");
            };
            flush(cur.replace(HugetlbVma {
                file: format!("{dev} {inode}"),
                private_kib: 0,
                shared_kib: 0,
            }));
            continue;
        }
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let (Some(vma), "Private_Hugetlb" | "Shared_Hugetlb") = (cur.as_mut(), key) else {
            continue;
        };
        let kib: u64 = rest
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("bad value in line {line:?}"))?;
        if key == "Private_Hugetlb" {
            vma.private_kib = kib;
        } else {
            vma.shared_kib = kib;
        }
    }
    flush(cur);
    Ok(out)
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
    fn parses_huge_pool() {
        let text = "MemTotal:       24684032 kB\n\
                    HugePages_Total:     600\n\
                    HugePages_Free:      590\n\
                    HugePages_Rsvd:        6\n\
                    HugePages_Surp:        0\n\
                    Hugepagesize:       2048 kB\n";
        let p = parse_huge_pool(text).unwrap();
        assert_eq!(
            p,
            HugePool {
                total: 600,
                free: 590,
                reserved: 6,
                page_kib: 2048
            }
        );
        assert_eq!((p.used(), p.available()), (10, 584));
        assert!(parse_huge_pool("MemTotal: 1 kB\n").is_err());
        huge_pool().unwrap();
    }

    #[test]
    fn parses_smaps_hugetlb() {
        let text = "\
7f4728e00000-7f4729600000 rw-p 00000000 00:11 225799                     /memfd:ram (deleted)
Size:               8192 kB
Rss:                   0 kB
Pss:                   0 kB
Shared_Hugetlb:     6144 kB
Private_Hugetlb:    2048 kB
VmFlags: rd wr mr mw me ht sd
7f4729600000-7f4729e00000 rw-s 00000000 00:11 225800                     /memfd:other (deleted)
Size:               8192 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
VmFlags: rd wr sh mr mw me ms ht sd
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  12 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
Shared_Hugetlb:     4096 kB
Private_Hugetlb:       0 kB
";
        let vmas = parse_smaps_hugetlb(text).unwrap();
        assert_eq!(
            vmas,
            [
                HugetlbVma {
                    file: "00:11 225799".into(),
                    private_kib: 2048,
                    shared_kib: 6144
                },
                HugetlbVma {
                    file: "00:00 0".into(),
                    private_kib: 0,
                    shared_kib: 4096
                }
            ]
        );
        assert!(parse_smaps_hugetlb("0-1 rw-p\n").is_err());
        assert!(hugetlb_vmas(std::process::id()).is_ok());
    }

    #[test]
    fn reads_own_process() {
        let u = mem_usage(std::process::id()).unwrap();
        assert!(u.rss_kib > 0);
        assert!(matches!(process_state(std::process::id()), Some('R' | 'S')));
    }
}
