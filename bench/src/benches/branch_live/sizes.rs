//! The LIVE pause against guest RAM size: a source of each size, filled,
//! writer running, branched LIVE with wait=false and followed to READY.

use std::time::{Duration, Instant};

use anyhow::Result;
use forkd_api::v1::BranchMode;

use super::{watch, Source, NAME};
use crate::benches::Iters;
use crate::client::Ctx;

/// Figures of one size.
#[derive(Default)]
pub struct SizeFigures {
    /// Guest RAM, MiB.
    pub memory_mib: u32,
    /// MiB filled.
    pub fill_mib: u32,
    /// VMM-reported pause, ms.
    pub pause_ms: Vec<f64>,
    /// Client round trip of BranchSandbox (wait=false).
    pub rpc: Vec<Duration>,
    /// From the request until READY.
    pub ready: Vec<Duration>,
    /// Bytes the copy had to handle (WatchSnapshot `bytes_total`).
    pub bytes_total: Vec<f64>,
}

/// Untimed branches per size before the measured ones.
const WARMUP: usize = 1;

/// Runs the sweep over `it.live_sizes`.
pub async fn run(ctx: &Ctx, it: &Iters) -> Result<Vec<SizeFigures>> {
    let mut all = Vec::new();
    for &memory_mib in &it.live_sizes {
        let src = Source::start(ctx, it, memory_mib).await?;
        let mut f = SizeFigures {
            memory_mib,
            fill_mib: src.fill_mib,
            ..Default::default()
        };
        for i in 0..WARMUP + it.live_size_iters {
            let tag = format!("{NAME}-ram{memory_mib}-{i}");
            let start = Instant::now();
            let (resp, rpc) = ctx
                .branch_wait(&src.id, &tag, BranchMode::Live, Some(false))
                .await?;
            let (followed, _) = watch::until_ready(ctx, &tag, start, None, Duration::ZERO).await?;
            ctx.delete_snapshot(&tag, false, false).await?;
            if i >= WARMUP {
                f.pause_ms.push(resp.pause_ms);
                f.rpc.push(rpc);
                f.ready.push(followed.ready_after);
                f.bytes_total.push(followed.bytes_total as f64);
            }
        }
        ctx.delete(&src.id).await?;
        all.push(f);
    }
    Ok(all)
}
