//! The guest's `dirty` sequence writer, seen from the benchmark: start it,
//! and read its progress (`seq`, pages stamped so far) through `stat`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::client::{Client, Ctx};

/// One reading of the writer's sequence number.
#[derive(Clone, Copy, Debug)]
pub struct SeqSample {
    /// Client time halfway through the `stat` Exec.
    pub at: Instant,
    /// Pages stamped since the writer started.
    pub seq: u64,
}

/// Pages per second between two readings.
pub fn rate(first: SeqSample, last: SeqSample) -> Option<f64> {
    let secs = last.at.checked_duration_since(first.at)?.as_secs_f64();
    (secs > 0.0 && last.seq >= first.seq).then(|| (last.seq - first.seq) as f64 / secs)
}

/// Starts the writer on vCPU 1 of `id`: `dirty PAGES RATE` (RATE 0 = as
/// fast as it can), and checks that it runs.
pub async fn start(ctx: &Ctx, client: &mut Client, id: &str, pages: u32, rate: u64) -> Result<()> {
    let (pages, rate) = (pages.to_string(), rate.to_string());
    ctx.exec(client, id, &["dirty", &pages, &rate], false)
        .await?;
    let first = read(ctx, client, id).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = read(ctx, client, id).await?;
    if second.seq <= first.seq {
        bail!(
            "the writer in {id} does not advance (seq {} then {})",
            first.seq,
            second.seq
        );
    }
    Ok(())
}

/// Reads the writer's `seq` from `stat` (`writer=running pages=.. rate=..
/// seq=N`); fails unless the writer is running.
pub async fn read(ctx: &Ctx, client: &mut Client, id: &str) -> Result<SeqSample> {
    let t0 = Instant::now();
    let out = ctx.exec(client, id, &["stat"], true).await?;
    let at = t0 + t0.elapsed() / 2;
    let text = String::from_utf8_lossy(&out.stdout);
    let seq = parse_seq(&text).with_context(|| format!("`stat` in {id} printed {text:?}"))?;
    Ok(SeqSample { at, seq })
}

/// The writer's seq from `stat` output, when the writer is running.
fn parse_seq(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("writer="))?;
    if !line.starts_with("writer=running") {
        return None;
    }
    line.split_whitespace()
        .find_map(|t| t.strip_prefix("seq="))?
        .parse()
        .ok()
}

/// The writer's pages/s over `window` of an otherwise idle sandbox.
pub async fn idle_rate(ctx: &Ctx, client: &mut Client, id: &str, window: Duration) -> Result<f64> {
    let first = read(ctx, client, id).await?;
    tokio::time::sleep(window).await;
    let last = read(ctx, client, id).await?;
    rate(first, last).context("the writer's seq went backwards")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_stat_writer_line() {
        let stat =
            "vcpus=2\nmemory_mib=256\nwriter=running pages=4096 rate=0 seq=123456\nrequests=7\n";
        assert_eq!(parse_seq(stat), Some(123456));
        assert_eq!(
            parse_seq("writer=stopped pages=4096 rate=0 seq=9\n"),
            None,
            "a stopped writer is an error"
        );
        assert_eq!(parse_seq("vcpus=2\n"), None);
    }

    #[test]
    fn rate_between_samples() {
        let t = Instant::now();
        let a = SeqSample { at: t, seq: 100 };
        let b = SeqSample {
            at: t + Duration::from_millis(500),
            seq: 600,
        };
        assert_eq!(rate(a, b), Some(1000.0));
        assert_eq!(rate(b, a), None);
    }
}
