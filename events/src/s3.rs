//! The standard S3 event notification, as the uploads stream carries it.
//!
//! Format: <https://docs.aws.amazon.com/AmazonS3/latest/userguide/notification-content-structure.html>.
//! MinIO and RustFS send the same `Records[]` with a few extra fields (`EventName` and `Key` at the
//! top, `contentType`/`userMetadata` on the object, a `source` block); unknown fields are ignored.
//! Object keys arrive URL-encoded the way HTML forms encode them (`+` is a space); use
//! [`S3Object::decoded_key`], never the raw field, to address the object.

use std::collections::BTreeMap;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::job::ObjectRef;
use crate::{EventError, Result};

/// A whole notification: one or more records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct S3Notification {
    /// The event records; AWS sends one per notification, others may batch.
    #[serde(rename = "Records")]
    pub records: Vec<S3EventRecord>,
}

/// What a payload on the uploads stream turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum S3Message {
    /// A notification with records to process.
    Records(Vec<S3EventRecord>),
    /// The `s3:TestEvent` AWS sends when notifications are configured: nothing to do.
    TestEvent,
}

/// Parses a payload as S3 sends it, tolerating the AWS, MinIO and RustFS variants.
///
/// The `s3:TestEvent` AWS posts when a notification is first configured parses as
/// [`S3Message::TestEvent`] rather than failing.
pub fn parse_s3_message(bytes: &[u8]) -> Result<S3Message> {
    let value: serde_json::Value = serde_json::from_slice(bytes)?;
    if value.get("Event").and_then(|e| e.as_str()) == Some("s3:TestEvent") {
        return Ok(S3Message::TestEvent);
    }
    if value.get("Records").is_none() {
        return Err(EventError::NotS3Notification(
            "no `Records` field in the payload".to_owned(),
        ));
    }
    let notification: S3Notification = serde_json::from_value(value)?;
    Ok(S3Message::Records(notification.records))
}

/// One S3 event record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3EventRecord {
    /// Record format version (`2.1` on AWS, `2.0` on MinIO).
    #[serde(default)]
    pub event_version: String,
    /// Who emitted it: `aws:s3`, `minio:s3`, `darkroom:ingest`, `darkroom:reconciler`.
    #[serde(default)]
    pub event_source: String,
    /// Region of the bucket (empty on most self-hosted servers).
    #[serde(default)]
    pub aws_region: String,
    /// When the event happened, ISO 8601 as the server wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<String>,
    /// `ObjectCreated:Put` on AWS, `s3:ObjectCreated:Put` on MinIO; see [`Self::is_object_created`].
    pub event_name: String,
    /// The principal that caused the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_identity: Option<Identity>,
    /// Request details (source IP and, on MinIO, access key and region).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub request_parameters: BTreeMap<String, String>,
    /// Response headers of the request that caused the event.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub response_elements: BTreeMap<String, String>,
    /// Bucket and object.
    pub s3: S3Entity,
}

impl S3EventRecord {
    /// Whether this record announces a new object (any `ObjectCreated:*` event).
    pub fn is_object_created(&self) -> bool {
        let name = self
            .event_name
            .strip_prefix("s3:")
            .unwrap_or(&self.event_name);
        name.starts_with("ObjectCreated:")
    }

    /// The object this record is about, with its key decoded.
    pub fn object_ref(&self) -> Result<ObjectRef> {
        Ok(ObjectRef {
            bucket: self.s3.bucket.name.clone(),
            key: self.s3.object.decoded_key()?,
            etag: self.s3.object.e_tag.as_deref().map(normalize_etag),
            version_id: self.s3.object.version_id.clone().filter(|v| !v.is_empty()),
            size: self.s3.object.size,
        })
    }

    /// A record for a new object, as Darkroom's own producers emit it.
    ///
    /// `source` is the `eventSource` to stamp (`darkroom:ingest`, `darkroom:reconciler`).
    pub fn object_created(source: &str, object: &ObjectRef, event_time: Option<String>) -> Self {
        S3EventRecord {
            event_version: "2.1".to_owned(),
            event_source: source.to_owned(),
            aws_region: String::new(),
            event_time,
            event_name: "ObjectCreated:Put".to_owned(),
            user_identity: None,
            request_parameters: BTreeMap::new(),
            response_elements: BTreeMap::new(),
            s3: S3Entity {
                s3_schema_version: "1.0".to_owned(),
                configuration_id: None,
                bucket: S3Bucket {
                    name: object.bucket.clone(),
                    owner_identity: None,
                    arn: Some(format!("arn:aws:s3:::{}", object.bucket)),
                },
                object: S3Object {
                    key: encode_key(&object.key),
                    size: object.size,
                    e_tag: object.etag.clone(),
                    version_id: object.version_id.clone(),
                    sequencer: None,
                    content_type: None,
                    user_metadata: BTreeMap::new(),
                },
            },
        }
    }
}

/// A principal, as `{"principalId": …}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// The principal's id.
    #[serde(default)]
    pub principal_id: String,
}

/// The `s3` block of a record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Entity {
    /// Always `1.0` so far.
    #[serde(default)]
    pub s3_schema_version: String,
    /// The notification configuration that matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration_id: Option<String>,
    /// The bucket.
    pub bucket: S3Bucket,
    /// The object.
    pub object: S3Object,
}

/// The bucket of a record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Bucket {
    /// Bucket name.
    pub name: String,
    /// Bucket owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_identity: Option<Identity>,
    /// Bucket ARN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arn: Option<String>,
}

/// The object of a record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Object {
    /// The key, URL-encoded (`red+flower.jpg`); see [`Self::decoded_key`].
    pub key: String,
    /// Size in bytes (absent on delete events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Entity tag, with or without quotes depending on the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e_tag: Option<String>,
    /// Version id when the bucket is versioned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    /// Ordering token for events on the same key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequencer: Option<String>,
    /// Content type (MinIO only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// User metadata (MinIO only; AWS leaves it out, ask with HEAD).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub user_metadata: BTreeMap<String, String>,
}

impl S3Object {
    /// The key as the object is addressed: `+` becomes a space, `%XX` sequences are decoded.
    pub fn decoded_key(&self) -> Result<String> {
        decode_key(&self.key)
    }
}

/// Decodes an S3 event key (`red+flower%2B1.jpg` → `red flower+1.jpg`).
pub fn decode_key(encoded: &str) -> Result<String> {
    let spaced = encoded.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .map(|key| key.into_owned())
        .map_err(|_| EventError::InvalidKeyEncoding {
            key: encoded.to_owned(),
        })
}

/// Characters left as they are when encoding a key: RFC 3986 unreserved plus `/`, as AWS does.
const KEY_ENCODE_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// Encodes a key as S3 events carry it (`red flower+1.jpg` → `red+flower%2B1.jpg`).
pub fn encode_key(key: &str) -> String {
    utf8_percent_encode(key, KEY_ENCODE_SET)
        .to_string()
        .replace("%20", "+")
}

/// An ETag without quotes, lower case: `"ABC-2"` → `abc-2`, so that listings and events agree.
pub fn normalize_etag(etag: &str) -> String {
    etag.trim().trim_matches('"').to_ascii_lowercase()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_decode_plus_as_space_and_percent_sequences() {
        assert_eq!(
            decode_key("inbox/red+flower%2B1.jpg").unwrap(),
            "inbox/red flower+1.jpg"
        );
        assert_eq!(decode_key("inbox%2Fa.jpg").unwrap(), "inbox/a.jpg");
        assert_eq!(
            decode_key("inbox/%E6%97%A5%E6%9C%AC/%C3%A9.png").unwrap(),
            "inbox/日本/é.png"
        );
    }

    #[test]
    fn invalid_utf8_in_a_key_is_an_error() {
        assert!(matches!(
            decode_key("inbox/%FF.jpg"),
            Err(EventError::InvalidKeyEncoding { .. })
        ));
    }

    #[test]
    fn encoding_round_trips_awkward_keys() {
        for key in [
            "inbox/red flower+1.jpg",
            "inbox/日本/é.png",
            "inbox/a%b&c=d?.jpg",
            "inbox/~tilde_-.jpg",
        ] {
            let encoded = encode_key(key);
            assert!(!encoded.contains(' '), "{encoded}");
            assert_eq!(decode_key(&encoded).unwrap(), key);
        }
        assert_eq!(
            encode_key("inbox/red flower+1.jpg"),
            "inbox/red+flower%2B1.jpg"
        );
    }

    #[test]
    fn etags_normalise() {
        assert_eq!(normalize_etag("\"ABCdef-2\""), "abcdef-2");
        assert_eq!(normalize_etag("abc"), "abc");
    }

    #[test]
    fn test_event_is_recognised() {
        let body = br#"{"Service":"Amazon S3","Event":"s3:TestEvent","Time":"2014-10-13T15:57:02.089Z","Bucket":"photos","RequestId":"5582815E1AEA5ADF","HostId":"8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE"}"#;
        assert_eq!(parse_s3_message(body).unwrap(), S3Message::TestEvent);
    }

    #[test]
    fn non_s3_payloads_are_typed_errors() {
        assert!(matches!(
            parse_s3_message(b"{\"hello\":1}"),
            Err(EventError::NotS3Notification(_))
        ));
        assert!(matches!(
            parse_s3_message(b"not json"),
            Err(EventError::Json(_))
        ));
        assert!(matches!(
            parse_s3_message(b"{\"Records\":[{\"eventName\":1}]}"),
            Err(EventError::Json(_))
        ));
    }

    #[test]
    fn created_events_are_recognised_with_or_without_prefix() {
        let object = ObjectRef::new("photos", "inbox/a.jpg");
        let mut record = S3EventRecord::object_created("test", &object, None);
        assert!(record.is_object_created());
        record.event_name = "s3:ObjectCreated:CompleteMultipartUpload".to_owned();
        assert!(record.is_object_created());
        record.event_name = "s3:ObjectRemoved:Delete".to_owned();
        assert!(!record.is_object_created());
    }
}
