//! live-huge: guest RAM in 4 KiB pages against 2 MiB huge pages
//! (`SpawnSandboxesRequest.huge_pages`), side by side in one run.
//!
//! 1. First LIVE branch (`first_live`): for every size of `huge_sizes`
//!    (256 MiB, 1.5 GiB, 4 GiB), `huge_reps` sandboxes of each page size,
//!    the two page sizes alternating (which one goes first alternates too):
//!    cold boot, `fill` half the RAM, then the sandbox's first LIVE branch
//!    with wait=false, followed on WatchSnapshot to READY; snapshot and
//!    sandbox deleted, and the VMM gone, before the next. Arming a LIVE
//!    branch write-protects guest RAM one page-table entry per page, which
//!    is what 2 MiB pages should make cheaper.
//! 2. Idle children (`children`): one FULL snapshot per page size (a
//!    `huge_child_memory_mib` guest with `huge_child_fill_mib` filled), one
//!    untimed child each (the first fork of a tag loads its memory), then
//!    `huge_children` children of each, read after `idle_wait`: PSS and
//!    hugetlb pages per child from `/proc/<pid>/smaps`, and host-wide
//!    `/proc/meminfo` deltas per child.
//!
//! The host's huge page pool (`pool`) is raised for the run when it is too
//! small and put back afterwards, also when the run fails.

mod children;
mod first_live;
mod pool;
mod report;

use anyhow::{ensure, Result};

use super::branch_live::FILL_START_MIB;
use super::Iters;
use crate::client::Ctx;
use crate::table::Table;

/// Benchmark name (also the sandbox label value and the snapshot tag
/// prefix).
pub const NAME: &str = "live-huge";

/// Pool headroom beyond twice the largest guest (source RAM plus its
/// snapshot's memory), MiB: the children's copy-on-write copies and slack.
const HEADROOM_MIB: u32 = 1024;

/// MiB per huge page.
const HUGE_PAGE_MIB: u32 = 2;

/// The two page sizes compared, 4 KiB first.
const PAGE_SIZES: [bool; 2] = [false, true];

/// Row label of a page size.
fn page_label(huge: bool) -> &'static str {
    if huge {
        "2 MiB"
    } else {
        "4 KiB"
    }
}

/// Tag part of a page size.
fn page_tag(huge: bool) -> &'static str {
    if huge {
        "2m"
    } else {
        "4k"
    }
}

/// Runs the benchmark.
pub async fn run(ctx: &Ctx, it: &Iters) -> Result<Vec<Table>> {
    let sizes = || {
        it.huge_sizes
            .iter()
            .chain(std::iter::once(&it.huge_child_memory_mib))
    };
    for &mib in sizes() {
        ensure!(
            mib % HUGE_PAGE_MIB == 0 && mib > FILL_START_MIB + 4,
            "live-huge: guest RAM {mib} MiB must be even (whole 2 MiB pages) and above {} MiB",
            FILL_START_MIB + 4
        );
    }
    let largest = sizes().copied().max().unwrap_or(0);
    let need_pages = u64::from((2 * largest + HEADROOM_MIB) / HUGE_PAGE_MIB);
    let guard = pool::PoolGuard::ensure(need_pages)?;
    let result = async {
        let first = first_live::run(ctx, it).await?;
        let kids = children::run(ctx, it).await?;
        Ok::<_, anyhow::Error>((first, kids))
    }
    .await;
    if result.is_err() {
        // Leftovers go before the pool shrinks back (the runner cleans up
        // too, but only after this returns).
        let _ = ctx.cleanup(NAME).await;
    }
    let note = guard.describe();
    guard.restore()?;
    let (first, kids) = result?;
    let mut tables = report::tables(it, &first, &kids);
    if let Some(t) = tables.first_mut() {
        t.note(note);
    }
    Ok(tables)
}
