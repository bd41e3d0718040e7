//! branch-pause: how long a FULL and a DIFF branch stop the guest.
//!
//! One cold-booted guest of `branch_memory_mib` with `branch_fill_mib`
//! filled (the warm state). For every dirty size S and iteration: `fill S`
//! with a new seed, FULL branch; `fill S` with a new seed, DIFF branch
//! (against that FULL, the guest's last snapshot); DeleteSnapshot of the
//! FULL with cascade (removes both). So the modes alternate, every branch
//! finds exactly S MiB rewritten since the previous snapshot, and at most
//! one pair exists at a time.
//!
//! Page-cache ballast: on a nested host that reports freed memory to the
//! outer hypervisor, writing a snapshot file is about 10 times slower when
//! its page-cache pages are fresh (every page faults in the outer
//! hypervisor) than when they are recycled from files deleted moments
//! earlier, and which branch gets which depends on the order of deletes.
//! So right before every branch (untimed) the benchmark writes and deletes
//! a scratch file somewhat larger than what the branch will write, and both
//! modes write into recycled pages, as they would on a host without that
//! effect. `--branch-no-ballast` measures without it.
//!
//! `pause_ms` is the VMM's own figure (vCPUs stopped until resumed); the
//! round trip is the client's time of the BranchSandbox RPC.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use forkd_api::v1::{BranchMode, BranchSandboxResponse};

use super::Iters;
use crate::client::{Ctx, GuestShape};
use crate::stats::{fmt_num, Samples};
use crate::table::Table;

/// Benchmark name (also the sandbox label value and the snapshot tag
/// prefix).
pub const NAME: &str = "branch-pause";

#[derive(Default)]
struct Figures {
    pause_ms: Vec<f64>,
    rpc: Vec<Duration>,
    bytes: Vec<f64>,
    dirty_pages: Vec<f64>,
}

impl Figures {
    fn push(&mut self, resp: &BranchSandboxResponse, rpc: Duration) {
        self.pause_ms.push(resp.pause_ms);
        self.rpc.push(rpc);
        self.bytes.push(resp.bytes_written as f64);
        self.dirty_pages.push(resp.dirty_pages as f64);
    }
}

/// Runs the benchmark.
pub async fn run(ctx: &Ctx, it: &Iters) -> Result<Vec<Table>> {
    let shape = GuestShape {
        memory_mib: it.branch_memory_mib,
        vcpus: 0,
        huge_pages: false,
    };
    let (resp, _) = ctx.spawn_with(NAME, 1, "", shape).await?;
    let id = resp.sandboxes[0].id.clone();
    let mut client = ctx.client();
    let fill_mib = it.branch_fill_mib.to_string();
    ctx.exec(&mut client, &id, &["fill", &fill_mib, "1"], false)
        .await?;

    // (size, mode) -> figures; BTreeMap keeps the sizes in order.
    let mut figs: BTreeMap<(u32, &str), Figures> = BTreeMap::new();
    let mut run = Run {
        ctx,
        it,
        client,
        id: id.clone(),
        seed: 100,
    };
    for &size in &it.branch_sizes {
        ensure!(
            size + 36 <= it.branch_memory_mib,
            "dirty size {size} MiB does not fit a {} MiB guest",
            it.branch_memory_mib
        );
    }
    // Untimed warm-up pairs.
    if let Some(&first) = it.branch_sizes.first() {
        for i in 0..WARMUP_PAIRS {
            run.pair(first, &format!("{NAME}-warmup-{i}"), None).await?;
        }
    }
    for &size in &it.branch_sizes {
        for i in 0..it.branch_iters {
            run.pair(size, &format!("{NAME}-{size}-{i}"), Some(&mut figs))
                .await?;
        }
    }
    ctx.delete(&id).await?;

    let mut table = Table::new(
        NAME,
        &[
            "dirty MiB",
            "mode",
            "n",
            "pause p50 ms",
            "pause p90 ms",
            "RPC p50 ms",
            "RPC p90 ms",
            "MiB written p50",
            "dirty pages p50",
        ],
    );
    let mut ratios = Vec::new();
    for &size in &it.branch_sizes {
        let mut p50 = BTreeMap::new();
        for mode in ["FULL", "DIFF"] {
            let Some(f) = figs.get(&(size, mode)) else {
                continue;
            };
            let pause = Samples::new(f.pause_ms.clone());
            let rpc = Samples::from_millis(&f.rpc);
            p50.insert(mode, (pause.p50(), rpc.p50()));
            table.row([
                size.to_string(),
                mode.to_string(),
                pause.len().to_string(),
                fmt_num(pause.p50()),
                fmt_num(pause.percentile(90.0)),
                fmt_num(rpc.p50()),
                fmt_num(rpc.percentile(90.0)),
                fmt_num(Samples::new(f.bytes.clone()).p50() / (1 << 20) as f64),
                fmt_num(Samples::new(f.dirty_pages.clone()).p50()),
            ]);
        }
        if let (Some(full), Some(diff)) = (p50.get("FULL"), p50.get("DIFF")) {
            ratios.push(format!(
                "{size} MiB dirty: FULL/DIFF p50 pause {}x, p50 round trip {}x",
                fmt_num(full.0 / diff.0),
                fmt_num(full.1 / diff.1)
            ));
        }
    }
    table.note(format!(
        "one cold-booted {} MiB guest (2 vCPUs) with {} MiB filled; per iteration: \
         `fill S` new seed, FULL; `fill S` new seed, DIFF against that FULL; delete both",
        it.branch_memory_mib, it.branch_fill_mib
    ));
    table.note(if it.branch_ballast {
        "before every branch (untimed): a scratch file 1.5x the branch's expected writes + \
         64 MiB written and deleted, so both modes write into recycled page cache"
    } else {
        "--branch-no-ballast: branches write into whatever page cache the host hands out"
    });
    table.note(format!(
        "{} iterations per size after {WARMUP_PAIRS} untimed warm-up pair(s), FULL and DIFF \
         alternating; pause = VMM-reported pause_ms, RPC = client round trip of \
         BranchSandbox (includes writing, digests, fsync)",
        it.branch_iters
    ));
    for r in ratios {
        table.note(r);
    }
    Ok(vec![table])
}

/// Untimed FULL+DIFF pairs before the measured ones.
const WARMUP_PAIRS: usize = 1;

/// The branching guest and where the run stands.
struct Run<'a> {
    ctx: &'a Ctx,
    it: &'a Iters,
    client: crate::client::Client,
    id: String,
    seed: u64,
}

impl Run<'_> {
    async fn fill(&mut self, mib: u32) -> Result<()> {
        self.seed += 1;
        let (mib, seed) = (mib.to_string(), self.seed.to_string());
        self.ctx
            .exec(&mut self.client, &self.id, &["fill", &mib, &seed], false)
            .await?;
        Ok(())
    }

    /// `fill S`, FULL; `fill S`, DIFF; delete both. Records the figures
    /// when `figs` is given.
    async fn pair(
        &mut self,
        size: u32,
        prefix: &str,
        mut figs: Option<&mut BTreeMap<(u32, &'static str), Figures>>,
    ) -> Result<()> {
        let full_tag = format!("{prefix}-full");
        let diff_tag = format!("{prefix}-diff");
        for (mode, tag) in [(BranchMode::Full, &full_tag), (BranchMode::Diff, &diff_tag)] {
            self.fill(size).await?;
            if self.it.branch_ballast {
                // What the branch will write: every non-zero page for FULL,
                // the rewritten ones for DIFF; plus a margin.
                let writes = if mode == BranchMode::Full {
                    self.it.branch_fill_mib.max(size)
                } else {
                    size
                };
                ballast(&self.ctx.scratch, writes + writes / 2 + 64).await?;
            }
            let (resp, rpc) = self.ctx.branch(&self.id, tag, mode).await?;
            check_reply(self.ctx, &resp, tag, mode, size);
            if let Some(figs) = figs.as_deref_mut() {
                let name = if mode == BranchMode::Full {
                    "FULL"
                } else {
                    "DIFF"
                };
                figs.entry((size, name)).or_default().push(&resp, rpc);
            }
        }
        let deleted = self.ctx.delete_snapshot(&full_tag, true, false).await?;
        if deleted.len() != 2 {
            self.ctx.observe(format!(
                "{NAME}: DeleteSnapshot({full_tag}, cascade) removed {deleted:?}, \
                 expected the diff and the full"
            ));
        }
        Ok(())
    }
}

/// Writes `mib` MiB of non-zero data to a scratch file in `dir` and deletes
/// it, leaving that much recently freed page cache for the next writer.
pub async fn ballast(dir: &Path, mib: u32) -> Result<()> {
    let path = dir.join("branch-ballast");
    tokio::task::spawn_blocking(move || -> Result<()> {
        let chunk: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8 + 1).collect();
        let mut f =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        for _ in 0..mib {
            f.write_all(&chunk)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        drop(f);
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
    })
    .await
    .context("ballast task panicked")?
}

fn check_reply(ctx: &Ctx, resp: &BranchSandboxResponse, tag: &str, mode: BranchMode, size: u32) {
    let Some(snap) = &resp.snapshot else {
        ctx.observe(format!("{NAME}: BranchSandbox({tag}) returned no snapshot"));
        return;
    };
    if snap.tag != tag || snap.mode != mode as i32 {
        ctx.observe(format!(
            "{NAME}: BranchSandbox({tag}, {mode:?}) returned tag {} mode {}",
            snap.tag, snap.mode
        ));
    }
    if resp.pause_ms <= 0.0 {
        ctx.observe(format!("{NAME}: {tag}: pause_ms {}", resp.pause_ms));
    }
    let size_bytes = u64::from(size) << 20;
    if mode == BranchMode::Diff && resp.bytes_written < size_bytes {
        ctx.observe(format!(
            "{NAME}: {tag}: DIFF wrote {} bytes, less than the {size} MiB rewritten",
            resp.bytes_written
        ));
    }
}
