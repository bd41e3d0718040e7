//! exec-echo: round trip of `Exec echo hi` on one sandbox over one
//! persistent HTTP/2 connection.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use super::{latency_row, Iters, LATENCY_HEADERS};
use crate::client::Ctx;
use crate::stats::{fmt_num, Samples};
use crate::table::Table;

/// Benchmark name (also the sandbox label value).
pub const NAME: &str = "exec-echo";

/// Runs the benchmark.
pub async fn run(ctx: &Ctx, it: &Iters) -> Result<Vec<Table>> {
    let (resp, _) = ctx.spawn(NAME, 1).await?;
    let id = resp.sandboxes[0].id.clone();
    let mut client = ctx.client();
    let argv = ["echo", "hi"];

    for _ in 0..it.echo_warmup {
        ctx.exec(&mut client, &id, &argv, false).await?;
    }

    let mut rtt = Vec::with_capacity(it.echo_iters);
    let mut guest = Vec::with_capacity(it.echo_iters);
    let start = Instant::now();
    for _ in 0..it.echo_iters {
        let t = Instant::now();
        let out = ctx.exec(&mut client, &id, &argv, true).await?;
        rtt.push(t.elapsed());
        ensure!(
            out.stdout == b"hi\n",
            "echo hi printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        guest.push(Duration::from_micros(out.duration_us));
    }
    let total = start.elapsed();
    ctx.delete(&id).await?;

    let mut table = Table::new(NAME, LATENCY_HEADERS);
    latency_row(
        &mut table,
        "Exec `echo hi` round trip (µs)",
        &Samples::from_micros(&rtt),
    );
    latency_row(
        &mut table,
        "guest-reported duration_us (µs)",
        &Samples::from_micros(&guest),
    );
    table.note(format!(
        "{} timed calls after {} warm-up calls, sequential, one channel; {} calls/s",
        it.echo_iters,
        it.echo_warmup,
        fmt_num(it.echo_iters as f64 / total.as_secs_f64()),
    ));
    table.note("round trip = client sends the request until it has read the exit message");
    Ok(vec![table])
}
