//! The host's pool of 2 MiB huge pages (`vm.nr_hugepages`), which a
//! `huge_pages` spawn draws its guest RAM from.

use crate::api::error::ApiError;

/// The huge page size forkd uses, KiB.
pub const HUGE_PAGE_KIB: u64 = 2048;

/// The pool as `/proc/meminfo` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HugePool {
    /// `HugePages_Total`: pages in the pool.
    pub total: u64,
    /// `HugePages_Free`: pages not in use (reserved ones included).
    pub free: u64,
    /// `HugePages_Rsvd`: pages promised to mappings but not touched yet.
    pub reserved: u64,
    /// `Hugepagesize`: the default huge page size, KiB.
    pub page_kib: u64,
}

impl HugePool {
    /// Reads `/proc/meminfo`.
    pub fn read() -> std::io::Result<HugePool> {
        let text = std::fs::read_to_string("/proc/meminfo")?;
        HugePool::parse(&text).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "/proc/meminfo has no HugePages_* lines (a kernel without hugetlbfs?)",
            )
        })
    }

    /// Parses the `HugePages_*` and `Hugepagesize` lines of
    /// `/proc/meminfo`'s text; `None` if one is missing.
    pub fn parse(meminfo: &str) -> Option<HugePool> {
        let field = |key: &str| {
            meminfo.lines().find_map(|line| {
                let rest = line.strip_prefix(key)?.strip_prefix(':')?;
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
        };
        Some(HugePool {
            total: field("HugePages_Total")?,
            free: field("HugePages_Free")?,
            reserved: field("HugePages_Rsvd")?,
            page_kib: field("Hugepagesize")?,
        })
    }

    /// Pages a new mapping can still reserve.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }
}

/// Checks that the pool can hold `n` sandboxes of `memory_mib` MiB each:
/// else RESOURCE_EXHAUSTED saying how many pages are missing and which
/// sysctl to raise. Each cold-booted huge-page VMM reserves all its RAM
/// when it maps it, so this is the whole need (children of a huge-page
/// snapshot take pages only as they write; see DESIGN.md).
pub fn check(n: usize, memory_mib: u32) -> Result<(), ApiError> {
    let pool = HugePool::read().map_err(|e| ApiError::HugePages {
        needed: 0,
        available: 0,
        total: 0,
        detail: format!("reading the host's huge page pool: {e}"),
    })?;
    let per_sandbox = u64::from(memory_mib) * 1024 / HUGE_PAGE_KIB;
    let needed = n as u64 * per_sandbox;
    if pool.page_kib != HUGE_PAGE_KIB {
        return Err(ApiError::HugePages {
            needed,
            available: 0,
            total: 0,
            detail: format!(
                "the host's default huge page size is {} KiB; forkd uses 2048 KiB pages",
                pool.page_kib
            ),
        });
    }
    if pool.available() < needed {
        return Err(ApiError::HugePages {
            needed,
            available: pool.available(),
            total: pool.total,
            detail: String::new(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "MemTotal:       24576000 kB\n\
        HugePages_Total:     600\n\
        HugePages_Free:      500\n\
        HugePages_Rsvd:      120\n\
        HugePages_Surp:        0\n\
        Hugepagesize:       2048 kB\n";

    #[test]
    fn parses_the_pool() {
        let pool = HugePool::parse(SAMPLE).unwrap();
        assert_eq!(
            pool,
            HugePool {
                total: 600,
                free: 500,
                reserved: 120,
                page_kib: 2048
            }
        );
        assert_eq!(pool.available(), 380);
        assert!(HugePool::parse("MemTotal: 1 kB\n").is_none());
    }
}
