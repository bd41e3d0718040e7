//! branch-live: how long a LIVE branch stops the guest, against DIFF and
//! FULL, and what its background copy costs the guest.
//!
//! 1. Comparison (`compare`): one cold-booted guest of `live_memory_mib`
//!    (1.5 GiB), as much of it filled as `fill` allows, the `dirty` writer
//!    running on vCPU 1 (by default as fast as it can over the largest
//!    ring). Every iteration branches it once in each way, in the order
//!    LIVE wait=true, LIVE wait=false (followed on WatchSnapshot to READY
//!    before anything else happens), DIFF (against that wait=false
//!    snapshot, the sandbox's base once READY), FULL. After each branch the
//!    snapshot before it is deleted (a DIFF together with its base), so the
//!    disk holds at most two. One untimed round first.
//! 2. Writer slowdown: at the start of every iteration the writer's
//!    pages/s over 0.5 s with nothing else running; during every wait=false
//!    copy its pages/s from the first to the last `stat` reading taken
//!    while the copy ran (one every ~20 ms).
//! 3. Pause against RAM (`sizes`): for every size in `live_sizes` a guest
//!    of that size, filled, writer running, branched LIVE wait=false and
//!    followed to READY, `live_size_iters` times after one untimed branch;
//!    each snapshot deleted before the next branch.
//!
//! Page-cache ballast (as in branch-pause; see its module comment): before
//! every branch of the comparison, in every mode, a scratch file of 1.5
//! times what the branch will write plus 64 MiB is written and deleted, so
//! every mode writes into recycled page cache. It matters for FULL and
//! DIFF pauses (they write while the guest is stopped) and for the copy
//! and round-trip times of LIVE; a LIVE pause writes no memory.
//! The sweep over sizes measures pauses only and has no ballast.

mod compare;
mod report;
mod sizes;
pub(super) mod watch;
mod writer;

use anyhow::{ensure, Result};

use super::Iters;
use crate::client::{Client, Ctx, GuestShape};
use crate::table::Table;

/// Benchmark name (also the sandbox label value and the snapshot tag
/// prefix).
pub const NAME: &str = "branch-live";

/// Where `fill` starts in guest RAM, MiB (forkd-guest-abi FILL_ADDR): a
/// guest of M MiB can fill M - 32.
pub(super) const FILL_START_MIB: u32 = 32;

/// Runs the benchmark.
pub async fn run(ctx: &Ctx, it: &Iters) -> Result<Vec<Table>> {
    let cmp = compare::run(ctx, it).await?;
    let sizes = sizes::run(ctx, it).await?;
    Ok(report::tables(it, &cmp, &sizes))
}

/// A running source: filled, writer running.
pub struct Source {
    /// Its sandbox id.
    pub id: String,
    /// A client for its Execs.
    pub client: Client,
    /// MiB filled.
    pub fill_mib: u32,
}

impl Source {
    /// Cold-boots a guest of `memory_mib`, fills it (all of it unless
    /// `live_fill_mib` says less) and starts the writer.
    pub async fn start(ctx: &Ctx, it: &Iters, memory_mib: u32) -> Result<Source> {
        ensure!(
            memory_mib > FILL_START_MIB + 4,
            "a {memory_mib} MiB guest is too small to fill"
        );
        let room = memory_mib - FILL_START_MIB;
        let fill_mib = it.live_fill_mib.map_or(room, |m| m.min(room));
        let shape = GuestShape {
            memory_mib,
            vcpus: 0,
            huge_pages: false,
        };
        let (resp, _) = ctx.spawn_with(NAME, 1, "", shape).await?;
        let id = resp.sandboxes[0].id.clone();
        let mut client = ctx.client();
        let mib = fill_mib.to_string();
        ctx.exec(&mut client, &id, &["fill", &mib, "1"], false)
            .await?;
        writer::start(
            ctx,
            &mut client,
            &id,
            it.live_writer_pages,
            it.live_writer_rate,
        )
        .await?;
        Ok(Source {
            id,
            client,
            fill_mib,
        })
    }
}
