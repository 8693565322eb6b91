//! The same handler on AWS Lambda, through `lambda_runtime`.
//!
//! Two invocation shapes are understood:
//!
//! - **direct** (S3 → Lambda, or any JSON event): the whole event is one [`Delivery`]. A
//!   transient error fails the invocation so Lambda's own retries and on-failure destination
//!   apply; a permanent error is reported (dead letter and `failed` event when a bus is
//!   configured) and the invocation succeeds, so Lambda does not retry what cannot succeed.
//! - **SQS batch** (S3 → SQS → Lambda): each record's body is one delivery; transient failures are
//!   returned as `batchItemFailures` (enable `ReportBatchItemFailures` on the event source
//!   mapping) so only they come back, and the queue's redrive policy dead-letters them.

use std::sync::Arc;

use bytes::Bytes;
use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::{Value, json};

use crate::consumer::give_up;
use crate::handler::{Delivery, Handler, HandlerError};
use crate::publish::Publisher;

/// Error type Lambda sees for a failed invocation.
pub type LambdaError = lambda_runtime::Error;

/// Serves `handler` as a Lambda function until the runtime stops it.
pub async fn run<H: Handler>(handler: H, publisher: Option<Publisher>) -> Result<(), LambdaError> {
    let handler = Arc::new(handler);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let handler = handler.clone();
        let publisher = publisher.clone();
        async move { invoke(&*handler, publisher.as_ref(), event.payload).await }
    }))
    .await
}

/// Handles one invocation payload; see the module docs for the two shapes.
pub async fn invoke<H: Handler>(
    handler: &H,
    publisher: Option<&Publisher>,
    payload: Value,
) -> Result<Value, LambdaError> {
    if is_sqs_batch(&payload) {
        return Ok(invoke_sqs_batch(handler, publisher, &payload).await);
    }
    let delivery = Delivery {
        subject: "lambda".to_owned(),
        payload: Bytes::from(payload.to_string()),
        attempt: 1,
        max_attempts: 0,
        traceparent: None,
    };
    match handler.handle(&delivery).await {
        Ok(()) => Ok(json!({ "status": "ok" })),
        Err(error) if error.is_permanent() => {
            report_permanent(handler, publisher, &delivery, &error).await?;
            Ok(json!({ "status": "failed", "reason": error.reason, "message": error.message }))
        }
        Err(error) => Err(Box::new(error)),
    }
}

fn is_sqs_batch(payload: &Value) -> bool {
    payload
        .get("Records")
        .and_then(Value::as_array)
        .and_then(|records| records.first())
        .and_then(|record| record.get("eventSource"))
        .and_then(Value::as_str)
        == Some("aws:sqs")
}

async fn invoke_sqs_batch<H: Handler>(
    handler: &H,
    publisher: Option<&Publisher>,
    payload: &Value,
) -> Value {
    let mut failures = Vec::new();
    let records = payload
        .get("Records")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for record in records {
        let message_id = record
            .get("messageId")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let attempt = record
            .pointer("/attributes/ApproximateReceiveCount")
            .and_then(Value::as_str)
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        let body = record
            .get("body")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let delivery = Delivery {
            subject: "aws:sqs".to_owned(),
            payload: Bytes::from(body.to_owned()),
            attempt,
            max_attempts: 0,
            traceparent: None,
        };
        let failed = match handler.handle(&delivery).await {
            Ok(()) => false,
            Err(error) if error.is_permanent() => {
                report_permanent(handler, publisher, &delivery, &error)
                    .await
                    .is_err()
            }
            Err(error) => {
                tracing::warn!(%message_id, error = %error.message, "transient failure; SQS will redeliver");
                true
            }
        };
        if failed {
            failures.push(json!({ "itemIdentifier": message_id }));
        }
    }
    json!({ "batchItemFailures": failures })
}

async fn report_permanent<H: Handler>(
    handler: &H,
    publisher: Option<&Publisher>,
    delivery: &Delivery,
    error: &HandlerError,
) -> Result<(), LambdaError> {
    tracing::warn!(reason = ?error.reason, error = %error.message, "permanent failure");
    if let Some(publisher) = publisher {
        let job = error.job.clone().or_else(|| handler.job_of(delivery));
        give_up(
            publisher,
            H::STAGE,
            delivery,
            None,
            error.reason,
            &error.message,
            job,
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Mutex;

    use darkroom_events::{FailureReason, Stage};

    use super::*;

    /// Fails on payloads containing "bad" (permanent) or "later" (transient).
    #[derive(Default)]
    struct Picky {
        seen: Mutex<Vec<(String, u32)>>,
    }

    impl Handler for Picky {
        const STAGE: Stage = Stage::Preprocess;

        async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
            let text = String::from_utf8_lossy(&delivery.payload).into_owned();
            self.seen
                .lock()
                .unwrap()
                .push((text.clone(), delivery.attempt));
            if text.contains("bad") {
                Err(HandlerError::permanent(
                    FailureReason::InvalidEvent,
                    "bad input",
                ))
            } else if text.contains("later") {
                Err(HandlerError::transient(
                    FailureReason::Internal,
                    "try later",
                ))
            } else {
                Ok(())
            }
        }
    }

    #[tokio::test]
    async fn direct_invocations_fail_only_when_a_retry_can_help() {
        let handler = Picky::default();
        let ok = invoke(&handler, None, json!({"Records": []}))
            .await
            .unwrap();
        assert_eq!(ok["status"], "ok");
        let permanent = invoke(&handler, None, json!({"x": "bad"})).await.unwrap();
        assert_eq!(permanent["status"], "failed");
        assert_eq!(permanent["reason"], "invalid_event");
        assert!(invoke(&handler, None, json!({"x": "later"})).await.is_err());
    }

    #[tokio::test]
    async fn sqs_batches_report_only_transient_failures() {
        let handler = Picky::default();
        let event = json!({"Records": [
            {"eventSource": "aws:sqs", "messageId": "m1", "body": "{\"fine\":1}", "attributes": {"ApproximateReceiveCount": "2"}},
            {"eventSource": "aws:sqs", "messageId": "m2", "body": "later"},
            {"eventSource": "aws:sqs", "messageId": "m3", "body": "bad"}
        ]});
        let response = invoke(&handler, None, event).await.unwrap();
        assert_eq!(
            response,
            json!({"batchItemFailures": [{"itemIdentifier": "m2"}]})
        );
        let seen = handler.seen.lock().unwrap();
        assert_eq!(seen[0], ("{\"fine\":1}".to_owned(), 2));
        assert_eq!(seen.len(), 3);
    }
}
