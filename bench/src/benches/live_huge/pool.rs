//! The host's 2 MiB huge page pool for the run: raised through
//! `/proc/sys/vm/nr_hugepages` when it has too few free pages, and put
//! back when the guard is dropped (an error or a panic included).

use anyhow::{ensure, Context, Result};

use crate::procfs::{self, HugePool};

/// The persistent size of the default huge page pool.
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Huge page size the benchmark needs, KiB.
const PAGE_KIB: u64 = 2048;

/// Holds the pool raised for the run; dropping it puts the old size back.
pub struct PoolGuard {
    /// `nr_hugepages` before the run, while the run's size is in place.
    restore: Option<u64>,
    /// The pool once it was large enough.
    pool: HugePool,
    /// Free, unreserved pages the run asked for.
    need: u64,
}

impl PoolGuard {
    /// Makes sure `need` 2 MiB pages are free and unreserved, raising
    /// `nr_hugepages` by what is missing (as root); fails with what to do
    /// otherwise.
    pub fn ensure(need: u64) -> Result<PoolGuard> {
        let pool = procfs::huge_pool()?;
        ensure!(
            pool.page_kib == PAGE_KIB,
            "the default huge page size here is {} KiB; live-huge needs 2 MiB pages (boot \
             with default_hugepagesz=2M)",
            pool.page_kib
        );
        if pool.available() >= need {
            return Ok(PoolGuard {
                restore: None,
                pool,
                need,
            });
        }
        let before = read_nr()?;
        let want = before + (need - pool.available());
        write_nr(want).with_context(|| {
            format!(
                "live-huge needs {need} free 2 MiB huge pages ({} MiB) and the host has {} free \
                 and unreserved; raising {NR_HUGEPAGES} from {before} to {want} failed (run as \
                 root, or raise it beforehand: `sysctl vm.nr_hugepages={want}`)",
                need * 2,
                pool.available()
            )
        })?;
        let mut guard = PoolGuard {
            restore: Some(before),
            pool,
            need,
        };
        guard.pool = procfs::huge_pool()?;
        ensure!(
            guard.pool.available() >= need,
            "asked the kernel for {want} huge pages ({NR_HUGEPAGES}); it has {} ({} free, {} \
             reserved) and live-huge needs {need} free: too little free or unfragmented memory \
             (put back to {before})",
            guard.pool.total,
            guard.pool.free,
            guard.pool.reserved
        );
        Ok(guard)
    }

    /// A table note: the pool during the run.
    pub fn describe(&self) -> String {
        let raised = match self.restore {
            Some(before) => {
                format!("raised from {before} (vm.nr_hugepages) for the run and put back after it")
            }
            None => "already large enough, left as it was".to_string(),
        };
        format!(
            "host huge page pool: {} 2 MiB pages, {} free at the start ({} needed: twice the \
             largest guest + 1 GiB); {raised}",
            self.pool.total, self.pool.free, self.need
        )
    }

    /// Puts the old size back now, reporting a failure.
    pub fn restore(mut self) -> Result<()> {
        match self.restore.take() {
            Some(before) => {
                write_nr(before).with_context(|| format!("putting {NR_HUGEPAGES} back to {before}"))
            }
            None => Ok(()),
        }
    }
}

impl Drop for PoolGuard {
    fn drop(&mut self) {
        if let Some(before) = self.restore.take() {
            if let Err(e) = write_nr(before) {
                eprintln!("  ! live-huge: putting {NR_HUGEPAGES} back to {before} failed: {e:#}");
            }
        }
    }
}

fn read_nr() -> Result<u64> {
    let text =
        std::fs::read_to_string(NR_HUGEPAGES).with_context(|| format!("reading {NR_HUGEPAGES}"))?;
    text.trim()
        .parse()
        .with_context(|| format!("{NR_HUGEPAGES} holds {text:?}"))
}

fn write_nr(pages: u64) -> Result<()> {
    std::fs::write(NR_HUGEPAGES, format!("{pages}\n"))
        .with_context(|| format!("writing {pages} to {NR_HUGEPAGES}"))
}
