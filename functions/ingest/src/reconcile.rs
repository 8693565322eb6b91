//! The reconciler: every S3 notification system can drop events (SeaweedFS drops them when the
//! webhook is down), so the inbox is listed at start and periodically, and every object without
//! a job record or a receipt is relayed as if its event had arrived.
//!
//! A sweep's cost follows what is new, not the bucket's size: the listing is paged (1,000 keys
//! a request), and only objects modified since the previous sweep, less a margin
//! ([`Watermark`]), are examined (a KV read, and a receipt HEAD when there is no record).
//! Older objects were examined by an earlier sweep of this process; the first sweep after a
//! start examines everything once.

use aws_sdk_s3::primitives::DateTime as S3DateTime;
use chrono::{DateTime, TimeDelta, Utc};
use darkroom_events::ObjectRef;

use crate::relay::{Relayed, UploadRelay};
use crate::{IngestError, Result};

/// Counts of one reconciliation pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Objects listed under the inbox.
    pub listed: usize,
    /// Objects examined: modified since the watermark (every listed object on a full pass).
    pub examined: usize,
    /// Objects whose event had been lost, now published.
    pub published: usize,
}

/// What the reconciler has examined: every object modified before [`Self::examined_before`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watermark {
    examined_before: Option<DateTime<Utc>>,
}

impl Watermark {
    /// Whether an object last modified at `modified` needs examining.
    fn needs_examining(&self, modified: Option<DateTime<Utc>>) -> bool {
        match (self.examined_before, modified) {
            (Some(before), Some(modified)) => modified >= before,
            // Nothing examined yet, or an object the listing does not date.
            _ => true,
        }
    }

    /// After a whole sweep whose newest object was modified at `newest`: everything older
    /// than `newest - margin` has been examined. The margin covers clock skew between S3
    /// servers and uploads that become visible after their modification time. Never moves
    /// back.
    fn advance(&mut self, newest: Option<DateTime<Utc>>, margin: TimeDelta) {
        if let Some(newest) = newest {
            let candidate = newest - margin;
            if self.examined_before.is_none_or(|before| candidate > before) {
                self.examined_before = Some(candidate);
            }
        }
    }
}

/// Lists the inbox of `bucket` and relays every object that has no job yet: a full pass, as
/// `darkroom-ingest reconcile` runs it.
pub async fn reconcile(relay: &UploadRelay, bucket: &str) -> Result<ReconcileReport> {
    sweep(relay, bucket, &mut Watermark::default(), TimeDelta::zero()).await
}

/// One sweep: lists the inbox of `bucket`, examines what was modified since `watermark` and
/// relays what has no job yet; on success moves `watermark` to the newest object seen less
/// `margin`.
pub async fn sweep(
    relay: &UploadRelay,
    bucket: &str,
    watermark: &mut Watermark,
    margin: TimeDelta,
) -> Result<ReconcileReport> {
    let mut report = ReconcileReport::default();
    let mut newest: Option<DateTime<Utc>> = None;
    let mut pages = relay
        .s3()
        .list_objects_v2()
        .bucket(bucket)
        .prefix(relay.inbox_prefix())
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| {
            IngestError::Storage(format!(
                "list s3://{bucket}/{}: {}",
                relay.inbox_prefix(),
                darkroom_shared::s3::describe_error(&e)
            ))
        })?;
        for listed in page.contents() {
            let (Some(key), Some(etag)) = (listed.key(), listed.e_tag()) else {
                continue;
            };
            report.listed += 1;
            let modified = listed.last_modified().and_then(to_chrono);
            newest = newest.max(modified);
            if !watermark.needs_examining(modified) {
                continue;
            }
            report.examined += 1;
            let object = ObjectRef {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                etag: Some(darkroom_events::s3::normalize_etag(etag)),
                version_id: None,
                size: listed.size().and_then(|n| u64::try_from(n).ok()),
            };
            if let Relayed::Published(job) = relay.relay(object, "darkroom:reconciler").await? {
                tracing::info!(%job, key, "reconciler published an upload whose event was lost");
                report.published += 1;
                metrics::counter!(crate::metric::OBJECTS, "source" => "reconciler", "outcome" => "published")
                    .increment(1);
            }
        }
    }
    watermark.advance(newest, margin);
    Ok(report)
}

fn to_chrono(time: &S3DateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(time.secs(), time.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(secs, 0)
    }

    #[test]
    fn only_what_is_newer_than_the_watermark_less_the_margin_is_examined_again() {
        let mut watermark = Watermark::default();
        assert!(watermark.needs_examining(at(0)));
        watermark.advance(at(1_000), TimeDelta::seconds(100));
        assert!(!watermark.needs_examining(at(899)));
        assert!(watermark.needs_examining(at(900)));
        assert!(watermark.needs_examining(None));
        // An older newest (an object deleted since) never moves it back.
        watermark.advance(at(500), TimeDelta::seconds(100));
        assert!(!watermark.needs_examining(at(899)));
        // An empty listing leaves it where it is.
        watermark.advance(None, TimeDelta::seconds(100));
        assert!(!watermark.needs_examining(at(899)));
    }
}
