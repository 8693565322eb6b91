//! Upload receipts: the proof that an upload was taken in hand, kept as long as its results.
//!
//! Job records expire (30 days), the notifier's ledger sooner (7 days), the duplicate window
//! after 2 minutes; an upload left in the inbox outlives them all. So when preprocess decides
//! on an upload — it queues its job, or refuses it for good — it writes
//! `outputs/<job>/receipt.json` beside where the result goes, and neither ingest (relaying an
//! event or a listed object) nor preprocess makes a job for an upload that has no record but
//! has a receipt. The receipt lives as long as the outputs do, so an upload is processed once
//! for as long as it stays, however long its records lived.
//!
//! Order matters: preprocess creates the job record before it writes the receipt, so "a
//! receipt and no record" can only mean the record has expired (or was deleted), never a
//! half-done first attempt.

use aws_sdk_s3::primitives::ByteStream;
use chrono::{DateTime, Utc};
use darkroom_events::{JobId, ObjectRef};
use serde::{Deserialize, Serialize};

use crate::fetch::{self, FetchError};

/// What preprocess decided on an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Its job was queued for inference.
    Queued,
    /// It was refused for good (a failure retrying cannot fix): `failed` was published.
    Refused,
}

/// `outputs/<job>/receipt.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    /// The job.
    pub job_id: JobId,
    /// The upload.
    pub source: ObjectRef,
    /// What was decided.
    pub decision: Decision,
    /// When.
    pub decided_at: DateTime<Utc>,
}

/// The key of `job`'s receipt.
pub fn key(job: JobId) -> String {
    format!("outputs/{job}/receipt.json")
}

/// Whether `job`'s receipt exists in `bucket`.
///
/// # Errors
/// S3 failed or could not be reached (transient).
pub async fn exists(s3: &aws_sdk_s3::Client, bucket: &str, job: JobId) -> Result<bool, FetchError> {
    match fetch::head(s3, &ObjectRef::new(bucket, key(job))).await {
        Ok(_) => Ok(true),
        Err(FetchError::NotFound { .. }) => Ok(false),
        Err(error) => Err(error),
    }
}

/// Writes `receipt` into the upload's bucket.
///
/// # Errors
/// S3 refused or failed the PUT.
pub async fn write(s3: &aws_sdk_s3::Client, receipt: &Receipt) -> crate::Result<()> {
    let body = serde_json::to_vec_pretty(receipt)
        .map_err(|e| crate::RuntimeError::Storage(format!("encode receipt: {e}")))?;
    let key = key(receipt.job_id);
    s3.put_object()
        .bucket(&receipt.source.bucket)
        .key(&key)
        .content_type("application/json")
        .body(ByteStream::from(body))
        .send()
        .await
        .map_err(|e| {
            crate::RuntimeError::Storage(format!(
                "PUT s3://{}/{key}: {}",
                receipt.source.bucket,
                crate::s3::describe_error(&e)
            ))
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_receipt_lies_beside_the_result() {
        let job = JobId::for_object("photos", "inbox/a.jpg", "etag");
        assert_eq!(key(job), format!("outputs/{job}/receipt.json"));
    }
}
