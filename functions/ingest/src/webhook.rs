//! The HTTP endpoint S3-side notifiers post to.
//!
//! | route | body |
//! |---|---|
//! | `POST /v1/events/seaweedfs` | one SeaweedFS filer event |
//! | `POST /v1/events/s3` | a standard S3 notification (`Records[]`), as MinIO, RustFS or Ceph webhooks post it |
//! | `GET /healthz` | — |
//!
//! Answers `200` with counts when the body was handled (including "nothing to do"), `400` for a
//! body that is not what the route takes, `413` past the size limit, and `503` when the bus or
//! the store is down, so notifiers that retry (MinIO does) try again.

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use darkroom_events::FailureReason;
use darkroom_events::s3::{S3Message, parse_s3_message};
use serde::Serialize;
use serde_json::json;

use crate::IngestError;
use crate::relay::{Relayed, UploadRelay};
use crate::seaweedfs::FilerEvent;

/// What the endpoint needs.
#[derive(Clone)]
pub struct WebhookState {
    /// The relay onto the uploads stream.
    pub relay: UploadRelay,
    /// The watched bucket.
    pub bucket: String,
}

/// Counts returned for a handled body.
#[derive(Debug, Default, Serialize)]
pub struct Handled {
    /// Objects published on the uploads stream.
    pub published: usize,
    /// Objects already known.
    pub duplicates: usize,
    /// Events that announce nothing to process.
    pub ignored: usize,
}

/// The router, with bodies limited to `max_body_bytes`.
pub fn router(state: WebhookState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/events/seaweedfs", post(seaweedfs))
        .route("/v1/events/s3", post(s3_records))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn seaweedfs(
    State(state): State<WebhookState>,
    body: Bytes,
) -> Result<Json<Handled>, IngestError> {
    let event: FilerEvent = serde_json::from_slice(&body)
        .map_err(|e| IngestError::BadPayload(format!("not a SeaweedFS filer event: {e}")))?;
    let mut handled = Handled::default();
    match event.uploaded_object(&state.bucket) {
        Ok(object) => {
            count(
                &mut handled,
                state.relay.relay(object, "darkroom:ingest").await?,
            );
        }
        Err(skip) => {
            tracing::debug!(key = %event.key, ?skip, "filer event is not an upload");
            handled.ignored += 1;
        }
    }
    Ok(Json(handled))
}

async fn s3_records(
    State(state): State<WebhookState>,
    body: Bytes,
) -> Result<Json<Handled>, IngestError> {
    let records = match parse_s3_message(&body) {
        Ok(S3Message::Records(records)) => records,
        Ok(S3Message::TestEvent) => {
            tracing::info!("S3 test event received");
            return Ok(Json(Handled {
                ignored: 1,
                ..Handled::default()
            }));
        }
        Err(e) => return Err(IngestError::BadPayload(e.to_string())),
    };
    let mut handled = Handled::default();
    for record in records {
        if !record.is_object_created() || record.s3.bucket.name != state.bucket {
            tracing::debug!(event = %record.event_name, bucket = %record.s3.bucket.name, "record is not an upload to the watched bucket");
            handled.ignored += 1;
            continue;
        }
        let object = record
            .object_ref()
            .map_err(|e| IngestError::BadPayload(e.to_string()))?;
        count(
            &mut handled,
            state.relay.relay(object, "darkroom:ingest").await?,
        );
    }
    Ok(Json(handled))
}

fn count(handled: &mut Handled, relayed: Relayed) {
    let outcome = match relayed {
        Relayed::Published(_) => {
            handled.published += 1;
            "published"
        }
        Relayed::Duplicate(_) => {
            handled.duplicates += 1;
            "duplicate"
        }
        Relayed::OutsideInbox | Relayed::Vanished => {
            handled.ignored += 1;
            "ignored"
        }
    };
    metrics::counter!(crate::metric::OBJECTS, "source" => "webhook", "outcome" => outcome)
        .increment(1);
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let (status, reason) = match &self {
            IngestError::BadPayload(_) => (StatusCode::BAD_REQUEST, FailureReason::InvalidEvent),
            IngestError::Storage(_) | IngestError::Runtime(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, FailureReason::Internal)
            }
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "webhook failed");
        } else {
            tracing::warn!(error = %self, "webhook rejected a body");
        }
        (
            status,
            Json(json!({ "error": self.to_string(), "reason": reason })),
        )
            .into_response()
    }
}
