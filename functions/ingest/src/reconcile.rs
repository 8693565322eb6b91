//! The reconciler: every S3 notification system can drop events (SeaweedFS drops them when the
//! webhook is down), so the inbox is listed at start and periodically, and every object without
//! a job record is relayed as if its event had arrived.

use darkroom_events::ObjectRef;

use crate::relay::{Relayed, UploadRelay};
use crate::{IngestError, Result};

/// Counts of one reconciliation pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Objects listed under the inbox.
    pub listed: usize,
    /// Objects whose event had been lost, now published.
    pub published: usize,
}

/// Lists the inbox of `bucket` and relays every object that has no job yet.
pub async fn reconcile(relay: &UploadRelay, bucket: &str) -> Result<ReconcileReport> {
    let mut report = ReconcileReport::default();
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
                aws_sdk_s3::error::DisplayErrorContext(e)
            ))
        })?;
        for listed in page.contents() {
            let (Some(key), Some(etag)) = (listed.key(), listed.e_tag()) else {
                continue;
            };
            report.listed += 1;
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
    Ok(report)
}
