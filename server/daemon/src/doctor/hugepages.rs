//! The hugepages check: the host's pool of 2 MiB huge pages, which backs
//! the RAM of sandboxes spawned with `huge_pages` (and their snapshots and
//! their children's copy-on-write copies).
//!
//! Reads `HugePages_Total`, `HugePages_Free`, `HugePages_Rsvd` and
//! `Hugepagesize` from `/proc/meminfo`. An empty pool, one with no page
//! left to take, or a default huge page size other than 2 MiB is a
//! warning, never a failure: only `huge_pages` spawns need the pool.

use super::report::Check;

/// Name of this check.
pub const NAME: &str = "hugepages";

/// The huge page size forkd backs guest RAM with, KiB.
pub const PAGE_KIB: u64 = 2048;

const MEMINFO: &str = "/proc/meminfo";

/// The huge page pool as `/proc/meminfo` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HugePool {
    /// `HugePages_Total`: pages in the pool.
    pub total: u64,
    /// `HugePages_Free`: pages not in use (reserved ones included).
    pub free: u64,
    /// `HugePages_Rsvd`: free pages promised to existing mappings.
    pub reserved: u64,
    /// `Hugepagesize`: the default huge page size, KiB.
    pub page_kib: u64,
}

impl HugePool {
    /// Free pages nobody has reserved: what a new mapping can take.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }

    /// MiB of `pages` pages of this pool's size.
    pub fn mib(&self, pages: u64) -> u64 {
        pages * self.page_kib / 1024
    }
}

/// Why the pool could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HugePoolError {
    /// `/proc/meminfo` could not be read.
    #[error("cannot read {MEMINFO}: {0}")]
    Read(#[source] std::io::Error),
    /// A field is missing (a kernel built without hugetlbfs).
    #[error("{MEMINFO} has no {0} line: this kernel has no hugetlb support")]
    Missing(&'static str),
    /// A field's value is not a number.
    #[error("{MEMINFO}: {line:?} is not `{field}: <number>`")]
    Malformed {
        /// The field.
        field: &'static str,
        /// The whole line.
        line: String,
    },
}

/// Parses the pool's four fields out of `/proc/meminfo` text.
pub fn parse_meminfo(text: &str) -> Result<HugePool, HugePoolError> {
    let field = |name: &'static str| -> Result<u64, HugePoolError> {
        let line = text
            .lines()
            .find(|l| l.split_once(':').is_some_and(|(k, _)| k == name))
            .ok_or(HugePoolError::Missing(name))?;
        let malformed = || HugePoolError::Malformed {
            field: name,
            line: line.to_owned(),
        };
        let (_, rest) = line.split_once(':').ok_or_else(malformed)?;
        let mut words = rest.split_whitespace();
        let value = words.next().and_then(|v| v.parse().ok());
        match (value, words.next(), words.next()) {
            (Some(v), None | Some("kB"), None) => Ok(v),
            _ => Err(malformed()),
        }
    };
    Ok(HugePool {
        total: field("HugePages_Total")?,
        free: field("HugePages_Free")?,
        reserved: field("HugePages_Rsvd")?,
        page_kib: field("Hugepagesize")?,
    })
}

/// Reads and parses `/proc/meminfo`.
pub fn read_pool() -> Result<HugePool, HugePoolError> {
    let text = std::fs::read_to_string(MEMINFO).map_err(HugePoolError::Read)?;
    parse_meminfo(&text)
}

/// How to grow the pool; `refused` says what happens until then.
fn raise_hint(refused: &str) -> String {
    format!(
        "{refused}: raise the pool with `sysctl vm.nr_hugepages=N` (or write N to \
         /proc/sys/vm/nr_hugepages; `vm.nr_hugepages = N` in /etc/sysctl.d/ keeps it across \
         reboots), N = 512 per GiB of huge-page guest RAM (a sandbox, its snapshots and its \
         children's copy-on-write copies all draw from the pool); sandboxes without huge_pages \
         are not affected"
    )
}

/// The verdict on a pool that was read.
fn judge(pool: &HugePool) -> Check {
    let min = u64::from(forkd_guest_abi::MIN_MEMORY_MIB);
    if pool.page_kib != PAGE_KIB {
        return Check::warn(
            NAME,
            format!(
                "the default huge page size is {} KiB, not 2 MiB ({} pages in its pool)",
                pool.page_kib, pool.total
            ),
            raise_hint(
                "forkd backs huge_pages guests with 2 MiB pages from the default pool, so \
                 huge_pages spawns are refused (RESOURCE_EXHAUSTED) until the kernel boots with \
                 `default_hugepagesz=2M` and",
            ),
        );
    }
    let max_mib = pool.mib(pool.available());
    let finding = format!(
        "2 MiB huge pages: {} total, {} free ({} MiB), {} reserved",
        pool.total,
        pool.free,
        pool.mib(pool.free),
        pool.reserved
    );
    if max_mib < min {
        let why = if pool.total == 0 {
            "the pool is empty"
        } else {
            "too few are left"
        };
        return Check::warn(
            NAME,
            format!("{finding}: {why}, no huge_pages sandbox fits"),
            raise_hint(
                "huge_pages spawns are refused (RESOURCE_EXHAUSTED naming vm.nr_hugepages) until \
                 the pool has room",
            ),
        );
    }
    Check::ok(
        NAME,
        format!("{finding}: huge_pages sandboxes up to {max_mib} MiB of RAM"),
    )
}

/// The check. Every outcome short of ok is a warning: only `huge_pages`
/// spawns need the pool.
pub fn check() -> Check {
    match read_pool() {
        Ok(pool) => judge(&pool)
            .with("page_size_kib", pool.page_kib)
            .with("total", pool.total)
            .with("free", pool.free)
            .with("reserved", pool.reserved)
            .with(
                "max_sandbox_mib",
                if pool.page_kib == PAGE_KIB {
                    pool.mib(pool.available()).into()
                } else {
                    serde_json::Value::Null
                },
            ),
        Err(e) => Check::warn(
            NAME,
            e.to_string(),
            "huge_pages spawns need a kernel with hugetlbfs (CONFIG_HUGETLBFS) and a 2 MiB pool \
             (`sysctl vm.nr_hugepages=N`); sandboxes without huge_pages are not affected",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::report::Status;
    use super::*;

    const SAMPLE: &str = "MemTotal:       24684032 kB\n\
                          MemFree:        13956216 kB\n\
                          AnonHugePages:         0 kB\n\
                          HugePages_Total:     600\n\
                          HugePages_Free:      590\n\
                          HugePages_Rsvd:        6\n\
                          HugePages_Surp:        0\n\
                          Hugepagesize:       2048 kB\n\
                          Hugetlb:         1228800 kB\n";

    fn pool(total: u64, free: u64, reserved: u64, page_kib: u64) -> HugePool {
        HugePool {
            total,
            free,
            reserved,
            page_kib,
        }
    }

    #[test]
    fn parses_sample() {
        let p = parse_meminfo(SAMPLE).unwrap();
        assert_eq!(p, pool(600, 590, 6, 2048));
        assert_eq!(p.available(), 584);
        assert_eq!(p.mib(p.available()), 1168);
    }

    #[test]
    fn missing_and_malformed_fields() {
        let no_hugetlb = "MemTotal:       24684032 kB\nAnonHugePages:         0 kB\n";
        assert!(matches!(
            parse_meminfo(no_hugetlb),
            Err(HugePoolError::Missing("HugePages_Total"))
        ));
        let bad = SAMPLE.replace("HugePages_Rsvd:        6", "HugePages_Rsvd:    six");
        let e = parse_meminfo(&bad).unwrap_err();
        assert!(
            matches!(
                e,
                HugePoolError::Malformed {
                    field: "HugePages_Rsvd",
                    ..
                }
            ),
            "{e}"
        );
        let unit = SAMPLE.replace("Hugepagesize:       2048 kB", "Hugepagesize: 2048 MB");
        assert!(parse_meminfo(&unit).is_err());
    }

    #[test]
    fn a_usable_pool_is_ok() {
        let c = judge(&pool(600, 600, 0, 2048));
        assert_eq!(c.status, Status::Ok);
        assert_eq!(
            c.finding,
            "2 MiB huge pages: 600 total, 600 free (1200 MiB), 0 reserved: huge_pages \
             sandboxes up to 1200 MiB of RAM"
        );
        assert!(c.hint.is_none());
    }

    #[test]
    fn an_empty_or_exhausted_pool_warns() {
        let c = judge(&pool(0, 0, 0, 2048));
        assert_eq!(c.status, Status::Warn);
        assert!(c.finding.contains("the pool is empty"), "{}", c.finding);
        assert!(c.hint.unwrap().contains("sysctl vm.nr_hugepages=N"));

        // Free pages all reserved: nothing for a new sandbox.
        let c = judge(&pool(20, 10, 10, 2048));
        assert_eq!(c.status, Status::Warn);
        assert!(c.finding.contains("too few are left"), "{}", c.finding);
    }

    #[test]
    fn another_default_size_warns() {
        let c = judge(&pool(4, 4, 0, 1_048_576));
        assert_eq!(c.status, Status::Warn);
        assert!(c.finding.contains("1048576 KiB"), "{}", c.finding);
        assert!(c.hint.unwrap().contains("default_hugepagesz=2M"));
    }

    #[test]
    fn never_fails_on_this_host() {
        assert_ne!(check().status, Status::Fail);
    }
}
