//! Fetching objects from S3 without trusting their size (uploads in preprocess, prepared
//! inputs in inference).
//!
//! [`head`] reads the object's size, ETag and metadata; a handler refuses an object over
//! the byte limit right there, before a single byte of it is downloaded. [`get_capped`] then
//! streams the body and stops as soon as it holds more than the limit, whatever the
//! `Content-Length` or the HEAD said (the object may have been replaced in between, or a
//! server may lie). The GET carries `If-Match` with the HEAD's ETag, so the bytes are those
//! of the object the HEAD described.
//!
//! A missing object (deleted, or replaced by a new upload with another ETag, which is a new
//! job of its own) is permanent: `object_not_found`. Anything else S3 says (5xx, throttling,
//! timeouts, refused connections, access denied while a policy is being fixed) is
//! transient, retried by the consumer loop and dead-lettered if it never clears.

use std::collections::HashMap;

use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectError;
use aws_sdk_s3::operation::head_object::HeadObjectError;
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use darkroom_events::{FailureReason, ObjectRef};

/// Why an object could not be fetched.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FetchError {
    /// The object does not exist (any more).
    #[error("{object} does not exist")]
    NotFound {
        /// `s3://bucket/key`.
        object: String,
    },
    /// The key now holds other content than the event announced.
    #[error(
        "{object} was replaced: the event announced ETag {announced}, the bucket holds {found}"
    )]
    Replaced {
        /// `s3://bucket/key`.
        object: String,
        /// The ETag in the event (this job's content).
        announced: String,
        /// The ETag in the bucket now.
        found: String,
    },
    /// The object is over the byte limit.
    #[error("{object} is {len} bytes or more, over the {max_bytes}-byte limit{}", if *.from_head { "" } else { " (stopped reading)" })]
    TooLarge {
        /// `s3://bucket/key`.
        object: String,
        /// Its size, or the bytes read when the download was cut.
        len: u64,
        /// The limit.
        max_bytes: u64,
        /// Whether the size came from the HEAD (nothing downloaded).
        from_head: bool,
    },
    /// S3 failed or could not be reached; retrying may help.
    #[error("S3 {operation} {object}: {message}")]
    Storage {
        /// `HEAD` or `GET`.
        operation: &'static str,
        /// `s3://bucket/key`.
        object: String,
        /// What the SDK said.
        message: String,
    },
}

impl FetchError {
    /// The reason code of the `failed` event this error produces when it is permanent.
    pub fn reason(&self) -> FailureReason {
        match self {
            FetchError::NotFound { .. } | FetchError::Replaced { .. } => {
                FailureReason::ObjectNotFound
            }
            FetchError::TooLarge { .. } => FailureReason::LimitExceeded,
            FetchError::Storage { .. } => FailureReason::Internal,
        }
    }

    /// Whether retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, FetchError::Storage { .. })
    }
}

/// What a HEAD says about an object.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ObjectInfo {
    /// Size in bytes.
    pub size: Option<u64>,
    /// ETag, normalised (no quotes, lower case).
    pub etag: Option<String>,
    /// The ETag exactly as the server sent it, for `If-Match`.
    pub raw_etag: Option<String>,
    /// Version id, on versioned buckets.
    pub version_id: Option<String>,
    /// User metadata (`x-amz-meta-<name>`), names in lower case.
    pub metadata: HashMap<String, String>,
}

impl ObjectInfo {
    /// A user metadata value (`name` without the `x-amz-meta-` prefix, any case).
    pub fn metadata(&self, name: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// HTTP status of a service error, when there is one.
fn status<E>(error: &SdkError<E>) -> Option<u16> {
    match error {
        SdkError::ServiceError(e) => Some(e.raw().status().as_u16()),
        SdkError::ResponseError(e) => Some(e.raw().status().as_u16()),
        _ => None,
    }
}

/// HEADs `object` (its version, when the event named one).
///
/// # Errors
/// [`FetchError::NotFound`] for a missing object, [`FetchError::Storage`] otherwise.
pub async fn head(s3: &aws_sdk_s3::Client, object: &ObjectRef) -> Result<ObjectInfo, FetchError> {
    let response = s3
        .head_object()
        .bucket(&object.bucket)
        .key(&object.key)
        .set_version_id(object.version_id.clone())
        .send()
        .await;
    match response {
        Ok(head) => Ok(ObjectInfo {
            size: head.content_length().and_then(|n| u64::try_from(n).ok()),
            etag: head.e_tag().map(darkroom_events::s3::normalize_etag),
            raw_etag: head.e_tag().map(str::to_owned),
            version_id: head.version_id().map(str::to_owned),
            metadata: head
                .metadata()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                        .collect()
                })
                .unwrap_or_default(),
        }),
        Err(SdkError::ServiceError(e)) if matches!(e.err(), HeadObjectError::NotFound(_)) => {
            Err(FetchError::NotFound {
                object: object.to_string(),
            })
        }
        Err(e) if status(&e) == Some(404) => Err(FetchError::NotFound {
            object: object.to_string(),
        }),
        Err(e) => Err(FetchError::Storage {
            operation: "HEAD",
            object: object.to_string(),
            message: crate::s3::describe_error(&e),
        }),
    }
}

/// GETs `object`, reading at most `max_bytes`; `if_match` is the ETag the HEAD returned.
///
/// # Errors
/// [`FetchError::TooLarge`] as soon as more than `max_bytes` arrive (or the response
/// declares more), [`FetchError::NotFound`] / [`FetchError::Replaced`] when the object is
/// gone or changed, [`FetchError::Storage`] otherwise.
pub async fn get_capped(
    s3: &aws_sdk_s3::Client,
    object: &ObjectRef,
    if_match: Option<&str>,
    max_bytes: usize,
) -> Result<Vec<u8>, FetchError> {
    let storage = |message: String| FetchError::Storage {
        operation: "GET",
        object: object.to_string(),
        message,
    };
    let response = s3
        .get_object()
        .bucket(&object.bucket)
        .key(&object.key)
        .set_version_id(object.version_id.clone())
        .set_if_match(if_match.map(str::to_owned))
        .send()
        .await;
    let response = match response {
        Ok(response) => response,
        Err(SdkError::ServiceError(e)) if matches!(e.err(), GetObjectError::NoSuchKey(_)) => {
            return Err(FetchError::NotFound {
                object: object.to_string(),
            });
        }
        Err(e) if status(&e) == Some(404) => {
            return Err(FetchError::NotFound {
                object: object.to_string(),
            });
        }
        Err(e) if status(&e) == Some(412) => {
            return Err(FetchError::Replaced {
                object: object.to_string(),
                announced: if_match.unwrap_or_default().to_owned(),
                found: "another (it changed after the HEAD)".to_owned(),
            });
        }
        Err(e) => return Err(storage(crate::s3::describe_error(&e))),
    };
    let declared = response
        .content_length()
        .and_then(|n| usize::try_from(n).ok());
    read_capped(response.body, declared, max_bytes)
        .await
        .map_err(|error| match error {
            CapError::Over(len) => FetchError::TooLarge {
                object: object.to_string(),
                len: len as u64,
                max_bytes: max_bytes as u64,
                from_head: false,
            },
            CapError::Body(message) => storage(message),
        })
}

/// A source of body chunks (the S3 response body; a fixed list in tests).
trait Chunks {
    async fn next_chunk(&mut self) -> Option<Result<Bytes, String>>;
}

impl Chunks for ByteStream {
    async fn next_chunk(&mut self) -> Option<Result<Bytes, String>> {
        self.next()
            .await
            .map(|chunk| chunk.map_err(|e| DisplayErrorContext(e).to_string()))
    }
}

#[derive(Debug, PartialEq)]
enum CapError {
    /// More than the cap: the bytes held when reading stopped (or the declared length).
    Over(usize),
    /// The body broke off.
    Body(String),
}

/// Reads chunks until the end or until more than `max_bytes` are held. `declared` (the
/// response's `Content-Length`) refuses early and sizes the buffer, but is never trusted
/// to bound the read.
async fn read_capped(
    mut body: impl Chunks,
    declared: Option<usize>,
    max_bytes: usize,
) -> Result<Vec<u8>, CapError> {
    if let Some(len) = declared
        && len > max_bytes
    {
        return Err(CapError::Over(len));
    }
    let mut out = Vec::with_capacity(declared.unwrap_or(0).min(max_bytes));
    while let Some(chunk) = body.next_chunk().await {
        let chunk = chunk.map_err(CapError::Body)?;
        if out.len() + chunk.len() > max_bytes {
            return Err(CapError::Over(out.len() + chunk.len()));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Chunks from a list; counts how many were pulled.
    struct Listed {
        chunks: std::vec::IntoIter<Result<Bytes, String>>,
        pulled: usize,
    }

    impl Listed {
        fn new(chunks: Vec<Result<Bytes, String>>) -> Self {
            Listed {
                chunks: chunks.into_iter(),
                pulled: 0,
            }
        }
    }

    impl Chunks for &mut Listed {
        async fn next_chunk(&mut self) -> Option<Result<Bytes, String>> {
            let next = self.chunks.next();
            if next.is_some() {
                self.pulled += 1;
            }
            next
        }
    }

    fn kb(n: usize) -> Result<Bytes, String> {
        Ok(Bytes::from(vec![7u8; n * 1024]))
    }

    #[tokio::test]
    async fn a_body_within_the_cap_is_read_whole() {
        let mut body = Listed::new(vec![kb(4), kb(4), kb(2)]);
        let bytes = read_capped(&mut body, Some(10 * 1024), 10 * 1024)
            .await
            .unwrap();
        assert_eq!(bytes.len(), 10 * 1024);
    }

    #[tokio::test]
    async fn a_lying_length_does_not_get_past_the_cap() {
        // Declares 1 KB, sends 1 MB: reading stops at the chunk that crosses 10 KB.
        let mut body = Listed::new((0..256).map(|_| kb(4)).collect());
        let error = read_capped(&mut body, Some(1024), 10 * 1024)
            .await
            .unwrap_err();
        assert_eq!(error, CapError::Over(12 * 1024));
        assert_eq!(body.pulled, 3);
        // No length at all (chunked): the same.
        let mut body = Listed::new((0..256).map(|_| kb(4)).collect());
        assert!(read_capped(&mut body, None, 10 * 1024).await.is_err());
        assert_eq!(body.pulled, 3);
    }

    #[tokio::test]
    async fn a_declared_length_over_the_cap_reads_nothing() {
        let mut body = Listed::new(vec![kb(4)]);
        let error = read_capped(&mut body, Some(11 * 1024), 10 * 1024)
            .await
            .unwrap_err();
        assert_eq!(error, CapError::Over(11 * 1024));
        assert_eq!(body.pulled, 0);
    }

    #[tokio::test]
    async fn a_broken_body_is_an_error() {
        let mut body = Listed::new(vec![kb(1), Err("connection reset".to_owned())]);
        assert_eq!(
            read_capped(&mut body, None, 10 * 1024).await.unwrap_err(),
            CapError::Body("connection reset".to_owned())
        );
    }

    #[test]
    fn only_storage_errors_are_retried() {
        let object = "s3://b/k".to_owned();
        let not_found = FetchError::NotFound {
            object: object.clone(),
        };
        assert!(not_found.is_permanent());
        assert_eq!(not_found.reason(), FailureReason::ObjectNotFound);
        let big = FetchError::TooLarge {
            object: object.clone(),
            len: 10,
            max_bytes: 5,
            from_head: true,
        };
        assert!(big.is_permanent());
        assert_eq!(big.reason(), FailureReason::LimitExceeded);
        assert!(!big.to_string().contains("stopped"), "{big}");
        let down = FetchError::Storage {
            operation: "GET",
            object,
            message: "connection refused".to_owned(),
        };
        assert!(!down.is_permanent());
    }

    #[test]
    fn metadata_names_match_in_any_case() {
        let info = ObjectInfo {
            metadata: HashMap::from([("preset".to_owned(), "desk-setup".to_owned())]),
            ..ObjectInfo::default()
        };
        assert_eq!(info.metadata("Preset"), Some("desk-setup"));
        assert_eq!(info.metadata("subject"), None);
    }
}
