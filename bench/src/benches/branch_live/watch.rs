//! Following a LIVE snapshot on WatchSnapshot until it is READY, while
//! sampling the source's writer.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use forkd_api::v1::{SnapshotStatus, WatchSnapshotRequest};
use tonic::Request;

use super::writer::{self, SeqSample};
use crate::client::{Client, Ctx};

/// What WatchSnapshot showed of one copy.
#[derive(Clone, Debug, Default)]
pub struct Followed {
    /// From `since` until the READY message arrived.
    pub ready_after: Duration,
    /// Messages received, READY included.
    pub messages: usize,
    /// The largest `faults_served` seen.
    pub faults_served: u64,
    /// The largest `bytes_total` seen (bytes of RAM the copy had to handle).
    pub bytes_total: u64,
}

/// Follows `tag` on WatchSnapshot until READY (an error on FAILED or when
/// the stream ends without either). `since` is when the branch was asked
/// for. With `sample` the writer of sandbox `source` is read every
/// `interval` meanwhile and the readings are returned.
pub async fn until_ready(
    ctx: &Ctx,
    tag: &str,
    since: Instant,
    sample: Option<(&mut Client, &str)>,
    interval: Duration,
) -> Result<(Followed, Vec<SeqSample>)> {
    let mut req = Request::new(WatchSnapshotRequest {
        tag: tag.to_string(),
    });
    req.set_timeout(Duration::from_secs(600));
    let mut stream = ctx
        .snapshots()
        .watch_snapshot(req)
        .await
        .with_context(|| format!("WatchSnapshot({tag})"))?
        .into_inner();
    let tag_owned = tag.to_string();
    let follow = tokio::spawn(async move {
        let mut f = Followed::default();
        loop {
            let msg = stream
                .message()
                .await
                .with_context(|| format!("WatchSnapshot({tag_owned}): reading the stream"))?;
            let Some(msg) = msg else {
                bail!("WatchSnapshot({tag_owned}) ended without READY or FAILED");
            };
            f.messages += 1;
            f.faults_served = f.faults_served.max(msg.faults_served);
            f.bytes_total = f.bytes_total.max(msg.bytes_total);
            match SnapshotStatus::try_from(msg.status) {
                Ok(SnapshotStatus::Ready) => {
                    f.ready_after = since.elapsed();
                    return Ok(f);
                }
                Ok(SnapshotStatus::Failed) => bail!(
                    "snapshot {tag_owned} FAILED during its copy: {}",
                    msg.failure_reason
                ),
                _ => {}
            }
        }
    });
    let mut samples = Vec::new();
    if let Some((client, source)) = sample {
        while !follow.is_finished() {
            samples.push(writer::read(ctx, client, source).await?);
            tokio::time::sleep(interval).await;
        }
    }
    let followed = follow.await.context("the WatchSnapshot task panicked")??;
    // Readings taken after READY arrived are not "during the copy".
    let ready_at = since + followed.ready_after;
    samples.retain(|s| s.at <= ready_at);
    Ok((followed, samples))
}
