//! unary: latency and throughput of small unary RPCs, GetSandbox against
//! grpc.health.v1 Check (no sandbox work at all) as the floor.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use forkd_api::v1::GetSandboxRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::Iters;
use crate::client::Ctx;
use crate::stats::{fmt_num, Samples};
use crate::table::Table;

/// Benchmark name (also the sandbox label value).
pub const NAME: &str = "unary";

/// Figures of one RPC.
struct Figures {
    seq: Samples,
    rps: f64,
    loaded: Samples,
    errors: u64,
    first_error: Option<String>,
}

/// Runs the benchmark.
pub async fn run(ctx: &Ctx, it: &Iters) -> Result<Vec<Table>> {
    let (resp, _) = ctx.spawn(NAME, 1).await?;
    let id = resp.sandboxes[0].id.clone();

    let get = {
        let client = ctx.client();
        let id = id.clone();
        move || {
            let mut client = client.clone();
            let id = id.clone();
            async move {
                let resp = client
                    .get_sandbox(GetSandboxRequest { id })
                    .await
                    .context("GetSandbox")?;
                anyhow::ensure!(
                    resp.into_inner().sandbox.is_some(),
                    "GetSandbox: no sandbox"
                );
                Ok(())
            }
        }
    };
    let health = {
        let client = HealthClient::new(ctx.channel.clone());
        move || {
            let mut client = client.clone();
            async move {
                client
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .context("health Check")?;
                Ok(())
            }
        }
    };

    let get_fig = measure(it, get).await?;
    let health_fig = measure(it, health).await?;
    ctx.delete(&id).await?;

    let mut table = Table::new(
        NAME,
        &[
            "RPC",
            "seq calls",
            "seq p50 µs",
            "seq p90 µs",
            "seq p99 µs",
            "concurrent req/s",
            "loaded p50 µs",
            "loaded p99 µs",
            "errors",
        ],
    );
    for (name, f) in [
        ("GetSandbox", &get_fig),
        ("grpc.health.v1 Check", &health_fig),
    ] {
        table.row([
            name.to_string(),
            f.seq.len().to_string(),
            fmt_num(f.seq.p50()),
            fmt_num(f.seq.percentile(90.0)),
            fmt_num(f.seq.percentile(99.0)),
            fmt_num(f.rps),
            fmt_num(f.loaded.p50()),
            fmt_num(f.loaded.percentile(99.0)),
            f.errors.to_string(),
        ]);
        if let Some(e) = &f.first_error {
            ctx.observe(format!("{NAME}: {name} failed under load: {e}"));
        }
    }
    table.note(format!(
        "sequential: {} timed calls after {} warm-up, one at a time",
        it.unary_iters, it.unary_warmup
    ));
    table.note(format!(
        "concurrent: {} callers in a closed loop for {:.1} s, all multiplexed on one HTTP/2 \
         connection; req/s counts successful calls",
        it.unary_concurrency,
        it.unary_duration.as_secs_f64()
    ));
    table.note("client and daemon share this host's CPUs");
    Ok(vec![table])
}

async fn measure<F, Fut>(it: &Iters, call: F) -> Result<Figures>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    for _ in 0..it.unary_warmup {
        call().await?;
    }
    let mut seq = Vec::with_capacity(it.unary_iters);
    for _ in 0..it.unary_iters {
        let t = Instant::now();
        call().await?;
        seq.push(t.elapsed());
    }

    let start = Instant::now();
    let deadline = start + it.unary_duration;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..it.unary_concurrency {
        let call = call.clone();
        set.spawn(async move {
            let mut lat: Vec<Duration> = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            while Instant::now() < deadline {
                let t = Instant::now();
                match call().await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            (lat, errors, first_error)
        });
    }
    let mut loaded = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    while let Some(res) = set.join_next().await {
        let (lat, e, fe) = res.context("caller task panicked")?;
        loaded.extend(lat);
        errors += e;
        if first_error.is_none() {
            first_error = fe;
        }
    }
    let elapsed = start.elapsed();
    Ok(Figures {
        seq: Samples::from_micros(&seq),
        rps: loaded.len() as f64 / elapsed.as_secs_f64(),
        loaded: Samples::from_micros(&loaded),
        errors,
        first_error,
    })
}
