//! cold-spawn: SpawnSandboxes of cold boots, one at a time and in a batch.
//!
//! The RPC returns once every sandbox answered a ping, so its wall time is
//! the time to a usable sandbox. `boot_ms` is the daemon's own figure per
//! sandbox (spawn request until first pong).

use std::time::Duration;

use anyhow::Result;

use super::{latency_row, Iters, LATENCY_HEADERS};
use crate::client::Ctx;
use crate::stats::{fmt_num, Samples};
use crate::table::Table;

/// Benchmark name (also the sandbox label value).
pub const NAME: &str = "cold-spawn";

/// Runs the benchmark.
pub async fn run(ctx: &Ctx, it: &Iters) -> Result<Vec<Table>> {
    let mut table = Table::new(NAME, LATENCY_HEADERS);

    // n = 1, deleting each sandbox before the next spawn.
    let mut wall = Vec::new();
    let mut boot = Vec::new();
    let mut server = Vec::new();
    let mut delete = Vec::new();
    let mut pids = Vec::new();
    for _ in 0..it.spawn1_reps {
        let (resp, w) = ctx.spawn(NAME, 1).await?;
        wall.push(w);
        server.push(resp.elapsed_ms);
        for sb in &resp.sandboxes {
            boot.push(sb.boot_ms);
            pids.push(sb.vmm_pid);
        }
        for sb in &resp.sandboxes {
            delete.push(ctx.delete(&sb.id).await?);
        }
    }
    latency_row(
        &mut table,
        "n=1: SpawnSandboxes wall (ms)",
        &Samples::from_millis(&wall),
    );
    latency_row(
        &mut table,
        "n=1: boot_ms, daemon-reported (ms)",
        &Samples::new(boot),
    );
    latency_row(
        &mut table,
        "n=1: elapsed_ms, daemon-reported (ms)",
        &Samples::new(server),
    );
    latency_row(
        &mut table,
        "n=1: DeleteSandbox (ms)",
        &Samples::from_millis(&delete),
    );
    ctx.check_vmms_gone(
        "cold-spawn n=1 after DeleteSandbox",
        &pids,
        Duration::from_secs(2),
    )
    .await;

    // A batch of n, deleted (concurrently) after each repetition.
    let n = it.batch_n;
    let mut wall = Vec::new();
    let mut boot = Vec::new();
    let mut delete = Vec::new();
    let mut started = Vec::new();
    pids.clear();
    for _ in 0..it.batch_reps {
        let (resp, w) = ctx.spawn(NAME, n).await?;
        wall.push(w);
        started.push(resp.sandboxes.len());
        boot.extend(resp.sandboxes.iter().map(|s| s.boot_ms));
        pids.extend(resp.sandboxes.iter().map(|s| s.vmm_pid));
        let ids: Vec<String> = resp.sandboxes.into_iter().map(|s| s.id).collect();
        delete.push(ctx.delete_many(&ids).await?);
    }
    let wall_ms = Samples::from_millis(&wall);
    latency_row(
        &mut table,
        &format!("n={n}: SpawnSandboxes wall (ms)"),
        &wall_ms,
    );
    latency_row(
        &mut table,
        &format!("n={n}: boot_ms per sandbox, daemon-reported (ms)"),
        &Samples::new(boot),
    );
    latency_row(
        &mut table,
        &format!("n={n}: delete all, {n} concurrent DeleteSandbox (ms)"),
        &Samples::from_millis(&delete),
    );
    ctx.check_vmms_gone(
        &format!("cold-spawn n={n} after DeleteSandbox"),
        &pids,
        Duration::from_secs(5),
    )
    .await;

    let default_shape = if ctx.shape.memory_mib == 0 && ctx.shape.vcpus == 0 {
        " (daemon defaults: 256 MiB, 2 vCPUs)".to_string()
    } else {
        String::new()
    };
    table.note(format!(
        "guest: memory_mib={} vcpus={}{default_shape}",
        ctx.shape.memory_mib, ctx.shape.vcpus
    ));
    table.note(format!(
        "n=1: {} repetitions, each sandbox deleted before the next spawn; no warm-up",
        it.spawn1_reps
    ));
    table.note(format!(
        "n={n}: {} repetitions; sandboxes started per repetition: {started:?}; \
         p50 rate {} sandboxes/s",
        it.batch_reps,
        fmt_num(f64::from(n) / (wall_ms.p50() / 1e3)),
    ));
    table.note(
        "wall = client-side time of the RPC, which returns when every sandbox answered a ping",
    );
    Ok(vec![table])
}
