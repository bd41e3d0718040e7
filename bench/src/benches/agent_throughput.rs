//! agent-throughput: bulk output from the guest (`emit BYTES`) through the
//! VMM, the daemon and gRPC to the client.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use super::Iters;
use crate::client::{Ctx, DEFAULT_GRPC_MAX_MESSAGE};
use crate::stats::{fmt_num, Samples};
use crate::table::Table;

/// Benchmark name (also the sandbox label value).
pub const NAME: &str = "agent-throughput";

const MIB: f64 = 1024.0 * 1024.0;

/// Runs the benchmark.
pub async fn run(ctx: &Ctx, it: &Iters) -> Result<Vec<Table>> {
    let (resp, _) = ctx.spawn(NAME, 1).await?;
    let id = resp.sandboxes[0].id.clone();
    let mut client = ctx.client();

    let mut table = Table::new(
        NAME,
        &[
            "payload",
            "runs",
            "p50 MiB/s",
            "min MiB/s",
            "max MiB/s",
            "p50 ms",
            "guest p50 ms",
            "chunks/run",
            "max chunk KiB",
        ],
    );
    for bytes in [8usize << 20, 1 << 20] {
        let arg = bytes.to_string();
        let argv = ["emit", arg.as_str()];
        // One untimed run to fault in buffers on every side.
        ctx.exec(&mut client, &id, &argv, false).await?;
        let mut rates = Vec::new();
        let mut times = Vec::new();
        let mut guest = Vec::new();
        let mut chunks = 0;
        let mut max_chunk = 0;
        for _ in 0..it.emit_runs {
            let t = Instant::now();
            let out = ctx.exec(&mut client, &id, &argv, false).await?;
            let elapsed = t.elapsed();
            ensure!(
                out.stdout_bytes == bytes as u64,
                "emit {bytes}: received {} bytes",
                out.stdout_bytes
            );
            rates.push(bytes as f64 / MIB / elapsed.as_secs_f64());
            times.push(elapsed);
            guest.push(Duration::from_micros(out.duration_us));
            chunks = out.chunks;
            max_chunk = max_chunk.max(out.max_chunk);
        }
        if max_chunk > DEFAULT_GRPC_MAX_MESSAGE {
            ctx.observe(format!(
                "{NAME}: Exec sent a {max_chunk}-byte stdout chunk, above the 4 MiB \
                 default receive limit of most gRPC clients"
            ));
        }
        let rates = Samples::new(rates);
        table.row([
            format!("{} MiB", bytes >> 20),
            it.emit_runs.to_string(),
            fmt_num(rates.p50()),
            fmt_num(rates.min()),
            fmt_num(rates.max()),
            fmt_num(Samples::from_millis(&times).p50()),
            fmt_num(Samples::from_millis(&guest).p50()),
            chunks.to_string(),
            fmt_num(max_chunk as f64 / 1024.0),
        ]);
    }
    ctx.delete(&id).await?;

    table.note(format!(
        "Exec `emit BYTES`, {} timed runs per size after 1 warm-up, stdout bytes counted and \
         checked; MiB/s = bytes / client wall time of the whole call",
        it.emit_runs
    ));
    table.note("guest p50 ms = daemon-reported duration_us of the command");
    Ok(vec![table])
}
