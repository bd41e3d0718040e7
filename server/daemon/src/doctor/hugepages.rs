//! The hugepages check: the host's pool of 2 MiB huge pages, which backs
//! the RAM of sandboxes spawned with `huge_pages` (and their snapshots and
//! their children's copy-on-write copies).
//!
//! Reads `HugePages_Total`, `HugePages_Free`, `HugePages_Rsvd` and
//! `Hugepagesize` from `/proc/meminfo` with the daemon's own reader
//! (`sandbox::huge_pages::HugePool`, what a `huge_pages` spawn checks). An
//! empty pool, one with no room for the smallest sandbox, or a default
//! huge page size other than 2 MiB is a warning, never a failure: only
//! `huge_pages` spawns need the pool.

use super::report::Check;
use crate::sandbox::huge_pages::{HugePool, HUGE_PAGE_KIB};

/// Name of this check.
pub const NAME: &str = "hugepages";

/// MiB of `pages` pages of `pool`'s size.
fn mib(pool: &HugePool, pages: u64) -> u64 {
    pages * pool.page_kib / 1024
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
    if pool.page_kib != HUGE_PAGE_KIB {
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
    let max_mib = mib(pool, pool.available());
    let finding = format!(
        "2 MiB huge pages: {} total, {} free ({} MiB), {} reserved",
        pool.total,
        pool.free,
        mib(pool, pool.free),
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
    match HugePool::read() {
        Ok(pool) => judge(&pool)
            .with("page_size_kib", pool.page_kib)
            .with("total", pool.total)
            .with("free", pool.free)
            .with("reserved", pool.reserved)
            .with(
                "max_sandbox_mib",
                if pool.page_kib == HUGE_PAGE_KIB {
                    mib(&pool, pool.available()).into()
                } else {
                    serde_json::Value::Null
                },
            ),
        Err(e) => Check::warn(
            NAME,
            format!("cannot read the huge page pool: {e}"),
            "huge_pages spawns need a kernel with hugetlbfs (CONFIG_HUGETLBFS) and a 2 MiB pool \
             (`sysctl vm.nr_hugepages=N`); sandboxes without huge_pages are not affected",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::report::Status;
    use super::*;

    fn pool(total: u64, free: u64, reserved: u64, page_kib: u64) -> HugePool {
        HugePool {
            total,
            free,
            reserved,
            page_kib,
        }
    }

    #[test]
    fn judges_sample_meminfo() {
        let text = "MemTotal:       24684032 kB\n\
                    AnonHugePages:         0 kB\n\
                    HugePages_Total:     600\n\
                    HugePages_Free:      590\n\
                    HugePages_Rsvd:        6\n\
                    HugePages_Surp:        0\n\
                    Hugepagesize:       2048 kB\n\
                    Hugetlb:         1228800 kB\n";
        let c = judge(&HugePool::parse(text).unwrap());
        assert_eq!(c.status, Status::Ok);
        assert_eq!(
            c.finding,
            "2 MiB huge pages: 600 total, 590 free (1180 MiB), 6 reserved: huge_pages \
             sandboxes up to 1168 MiB of RAM"
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

        // Room for less than the smallest sandbox.
        let c = judge(&pool(17, 17, 0, 2048));
        assert_eq!(c.status, Status::Warn);
        let c = judge(&pool(18, 18, 0, 2048));
        assert_eq!(c.status, Status::Ok, "{}", c.finding);
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
