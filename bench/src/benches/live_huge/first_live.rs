//! The first LIVE branch (wait=false) of a fresh, warm sandbox, 4 KiB
//! against 2 MiB pages, per RAM size.

use std::time::{Duration, Instant};

use anyhow::Result;
use forkd_api::v1::{BranchMode, SnapshotStatus};

use super::{page_label, page_tag, NAME, PAGE_SIZES};
use crate::benches::branch_live::{watch, FILL_START_MIB};
use crate::benches::fork_spawn::settle;
use crate::benches::Iters;
use crate::client::{Ctx, GuestShape};

/// Figures of one RAM size and page size.
pub struct Case {
    /// Guest RAM, MiB.
    pub memory_mib: u32,
    /// 2 MiB pages.
    pub huge: bool,
    /// MiB filled before the branch.
    pub fill_mib: u32,
    /// Client time of the cold SpawnSandboxes.
    pub spawn: Vec<Duration>,
    /// VMM-reported pause of the branch, ms.
    pub pause_ms: Vec<f64>,
    /// Client round trip of BranchSandbox (wait=false).
    pub rpc: Vec<Duration>,
    /// From the request until READY on WatchSnapshot.
    pub ready: Vec<Duration>,
    /// Bytes the copy handled (WatchSnapshot `bytes_total`).
    pub bytes_total: Vec<f64>,
}

impl Case {
    fn new(memory_mib: u32, huge: bool) -> Case {
        Case {
            memory_mib,
            huge,
            fill_mib: (memory_mib / 2).min(memory_mib - FILL_START_MIB),
            spawn: Vec::new(),
            pause_ms: Vec::new(),
            rpc: Vec::new(),
            ready: Vec::new(),
            bytes_total: Vec::new(),
        }
    }
}

/// Runs every size, the page sizes interleaved.
pub async fn run(ctx: &Ctx, it: &Iters) -> Result<Vec<Case>> {
    let mut all = Vec::new();
    for &memory_mib in &it.huge_sizes {
        let mut cases = PAGE_SIZES.map(|huge| Case::new(memory_mib, huge));
        for rep in 0..it.huge_reps {
            // Which page size goes first alternates, so neither always
            // follows the other's teardown.
            let order = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                once(ctx, &mut cases[i], rep).await?;
            }
        }
        all.extend(cases);
    }
    Ok(all)
}

/// Cold boot, fill, first LIVE branch followed to READY, teardown.
async fn once(ctx: &Ctx, case: &mut Case, rep: usize) -> Result<()> {
    let shape = GuestShape {
        memory_mib: case.memory_mib,
        vcpus: 0,
        huge_pages: case.huge,
    };
    let (resp, spawn) = ctx.spawn_with(NAME, 1, "", shape).await?;
    let sb = &resp.sandboxes[0];
    let (id, pid) = (sb.id.clone(), sb.vmm_pid);
    if sb.huge_pages != case.huge {
        ctx.observe(format!(
            "{NAME}: sandbox {id} spawned with huge_pages={} reports huge_pages={}",
            case.huge, sb.huge_pages
        ));
    }
    let mut client = ctx.client();
    let fill = case.fill_mib.to_string();
    ctx.exec(&mut client, &id, &["fill", &fill, "1"], false)
        .await?;

    let tag = format!("{NAME}-{}-{}-{rep}", case.memory_mib, page_tag(case.huge));
    let start = Instant::now();
    let (reply, rpc) = ctx
        .branch_wait(&id, &tag, BranchMode::Live, Some(false))
        .await?;
    let status = reply.snapshot.as_ref().map(|s| s.status).unwrap_or(0);
    if status != SnapshotStatus::Writing as i32 || reply.pause_ms <= 0.0 {
        ctx.observe(format!(
            "{NAME}: BranchSandbox({tag}, LIVE, wait=false) replied status {status}, pause_ms {}",
            reply.pause_ms
        ));
    }
    let (followed, _) = watch::until_ready(ctx, &tag, start, None, Duration::ZERO).await?;
    let snap = ctx.get_snapshot(&tag).await?;
    if snap.huge_pages != case.huge {
        ctx.observe(format!(
            "{NAME}: snapshot {tag} of a {} page sandbox reports huge_pages={}",
            page_label(case.huge),
            snap.huge_pages
        ));
    }
    ctx.delete_snapshot(&tag, false, false).await?;
    ctx.delete(&id).await?;
    // The next sandbox starts with this one's memory (and huge pages) back.
    settle(&[pid]).await;

    case.spawn.push(spawn);
    case.pause_ms.push(reply.pause_ms);
    case.rpc.push(rpc);
    case.ready.push(followed.ready_after);
    case.bytes_total.push(followed.bytes_total as f64);
    Ok(())
}
