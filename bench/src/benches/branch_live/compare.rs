//! LIVE (wait=true, wait=false) against DIFF and FULL on one writing
//! source, interleaved: every iteration branches once in each mode.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use forkd_api::v1::{BranchMode, SnapshotStatus};

use super::writer::{self, SeqSample};
use super::{watch, Source, NAME};
use crate::benches::branch_pause::ballast;
use crate::benches::Iters;
use crate::client::Ctx;
use crate::stats::Samples;

/// The four ways to branch that are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Way {
    /// LIVE, the call returns when the copy is READY.
    LiveWait,
    /// LIVE with wait=false: the call returns once the vCPUs run again.
    LiveNoWait,
    /// DIFF against the previous branch.
    Diff,
    /// FULL.
    Full,
}

impl Way {
    /// The order of one iteration. DIFF comes right after a branch whose
    /// snapshot is still there to be its base.
    pub const ORDER: [Way; 4] = [Way::LiveWait, Way::LiveNoWait, Way::Diff, Way::Full];

    /// Row label.
    pub fn label(self) -> &'static str {
        match self {
            Way::LiveWait => "LIVE wait=true",
            Way::LiveNoWait => "LIVE wait=false",
            Way::Diff => "DIFF",
            Way::Full => "FULL",
        }
    }

    fn tag_part(self) -> &'static str {
        match self {
            Way::LiveWait => "live",
            Way::LiveNoWait => "nowait",
            Way::Diff => "diff",
            Way::Full => "full",
        }
    }

    fn mode(self) -> BranchMode {
        match self {
            Way::LiveWait | Way::LiveNoWait => BranchMode::Live,
            Way::Diff => BranchMode::Diff,
            Way::Full => BranchMode::Full,
        }
    }

    fn wait(self) -> Option<bool> {
        (self == Way::LiveNoWait).then_some(false)
    }
}

/// Figures of one way over all iterations.
#[derive(Default)]
pub struct Figures {
    /// VMM-reported pause, ms.
    pub pause_ms: Vec<f64>,
    /// Client round trip of BranchSandbox.
    pub rpc: Vec<Duration>,
    /// From the request until READY (the round trip when the call waits).
    pub ready: Vec<Duration>,
    /// `memory_bytes` of the READY snapshot.
    pub memory_bytes: Vec<f64>,
    /// Write faults served during the copy (LIVE).
    pub faults: Vec<f64>,
    /// Dirty pages (DIFF).
    pub dirty_pages: Vec<f64>,
}

impl Figures {
    /// Pause samples.
    pub fn pause(&self) -> Samples {
        Samples::new(self.pause_ms.clone())
    }
}

/// Everything the comparison measured.
#[derive(Default)]
pub struct Outcome {
    /// Per way.
    pub figures: BTreeMap<Way, Figures>,
    /// Writer pages/s over 0.5 s with no branch running, one per iteration.
    pub idle_rates: Vec<f64>,
    /// Writer pages/s during each LIVE wait=false copy.
    pub copy_rates: Vec<f64>,
    /// Copies too short for two writer readings.
    pub copies_unsampled: usize,
    /// MiB filled in the source.
    pub fill_mib: u32,
}

/// Untimed rounds (one branch of each way) before the measured ones.
const WARMUP_ROUNDS: usize = 1;
/// Window of one idle writer-rate reading.
const IDLE_WINDOW: Duration = Duration::from_millis(500);
/// Pause between writer readings during a copy.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(20);

/// Runs the interleaved comparison.
pub async fn run(ctx: &Ctx, it: &Iters) -> Result<Outcome> {
    let mut src = Source::start(ctx, it, it.live_memory_mib).await?;
    let mut out = Outcome {
        fill_mib: src.fill_mib,
        ..Default::default()
    };
    // The snapshot kept as the next branch's base.
    let mut prev: Option<String> = None;
    for round in 0..WARMUP_ROUNDS + it.live_iters {
        let timed = round >= WARMUP_ROUNDS;
        if timed {
            let rate = writer::idle_rate(ctx, &mut src.client, &src.id, IDLE_WINDOW).await?;
            out.idle_rates.push(rate);
        }
        for way in Way::ORDER {
            let tag = format!("{NAME}-{}-{round}", way.tag_part());
            let one = branch_once(ctx, it, &mut src, way, &tag).await?;
            if timed {
                let f = out.figures.entry(way).or_default();
                f.pause_ms.push(one.pause_ms);
                f.rpc.push(one.rpc);
                f.ready.push(one.ready);
                f.memory_bytes.push(one.memory_bytes as f64);
                f.faults.push(one.faults as f64);
                f.dirty_pages.push(one.dirty_pages as f64);
                match one.copy_rate {
                    Some(r) => out.copy_rates.push(r),
                    None if way == Way::LiveNoWait => out.copies_unsampled += 1,
                    None => {}
                }
            }
            // Keep one snapshot as the base of what follows; a DIFF goes
            // with its base (cascade), which leaves no base, and FULL, the
            // next way, needs none.
            if way == Way::Diff {
                if let Some(base) = prev.take() {
                    expect_deleted(ctx, &base, true, 2).await?;
                }
            } else if let Some(old) = prev.replace(tag) {
                expect_deleted(ctx, &old, false, 1).await?;
            }
        }
    }
    if let Some(last) = prev {
        expect_deleted(ctx, &last, false, 1).await?;
    }
    ctx.delete(&src.id).await?;
    Ok(out)
}

/// DeleteSnapshot, noting anything other than `count` tags deleted.
async fn expect_deleted(ctx: &Ctx, tag: &str, cascade: bool, count: usize) -> Result<()> {
    let deleted = ctx.delete_snapshot(tag, cascade, false).await?;
    if deleted.len() != count {
        ctx.observe(format!(
            "{NAME}: DeleteSnapshot({tag}, cascade={cascade}) removed {deleted:?}, expected {count}"
        ));
    }
    Ok(())
}

/// What one branch gave.
struct One {
    pause_ms: f64,
    rpc: Duration,
    ready: Duration,
    memory_bytes: u64,
    faults: u64,
    dirty_pages: u64,
    copy_rate: Option<f64>,
}

/// Ballast, branch, and (wait=false) follow the copy to READY while
/// reading the writer.
async fn branch_once(ctx: &Ctx, it: &Iters, src: &mut Source, way: Way, tag: &str) -> Result<One> {
    if it.live_ballast {
        // What the branch will write: every non-zero page, or for DIFF the
        // writer's ring and a little more; plus a margin.
        let writes = match way {
            Way::Diff => (it.live_writer_pages / 256).max(1),
            _ => src.fill_mib,
        };
        ballast(&ctx.scratch, writes + writes / 2 + 64).await?;
    }
    let start = Instant::now();
    let (resp, rpc) = ctx
        .branch_wait(&src.id, tag, way.mode(), way.wait())
        .await?;
    let want = if way == Way::LiveNoWait {
        SnapshotStatus::Writing
    } else {
        SnapshotStatus::Ready
    };
    let status = resp.snapshot.as_ref().map(|s| s.status).unwrap_or(0);
    if status != want as i32 {
        ctx.observe(format!(
            "{NAME}: BranchSandbox({tag}, {}) replied with status {status}, expected {want:?}",
            way.label()
        ));
    }
    if resp.pause_ms <= 0.0 {
        ctx.observe(format!("{NAME}: {tag}: pause_ms {}", resp.pause_ms));
    }
    let mut one = One {
        pause_ms: resp.pause_ms,
        rpc,
        ready: rpc,
        memory_bytes: 0,
        faults: resp.faults_served,
        dirty_pages: resp.dirty_pages,
        copy_rate: None,
    };
    if way == Way::LiveNoWait {
        let sampler = Some((&mut src.client, src.id.as_str()));
        let (followed, samples) =
            watch::until_ready(ctx, tag, start, sampler, SAMPLE_INTERVAL).await?;
        one.ready = followed.ready_after;
        one.faults = followed.faults_served;
        one.copy_rate = copy_rate(&samples);
    }
    one.memory_bytes = ctx.get_snapshot(tag).await?.memory_bytes;
    Ok(one)
}

/// The writer's pages/s from the first to the last reading of a copy.
fn copy_rate(samples: &[SeqSample]) -> Option<f64> {
    match samples {
        [first, .., last] => writer::rate(*first, *last),
        _ => None,
    }
}
