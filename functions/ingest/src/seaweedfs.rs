//! SeaweedFS filer webhook events, and their conversion to the objects they announce.
//!
//! SeaweedFS posts its own format (configured in `notification.toml`, `[notification.webhook]`):
//! `{"event_type", "key", "message": {"old_entry", "new_entry", "new_parent_path", …}}`, where
//! byte fields (`md5`, every `extended` value) are base64 as Go encodes `[]byte`. It fires for
//! every filer entry: directories, multipart parts under `.uploads/`, its own `.system` files.
//! Only finished objects under `/buckets/<bucket>/` are uploads.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use darkroom_events::ObjectRef;
use serde::Deserialize;

/// Where SeaweedFS's S3 gateway keeps buckets in the filer namespace.
const BUCKETS_ROOT: &str = "/buckets/";
/// Extended attribute holding the S3 ETag.
const ETAG_ATTRIBUTE: &str = "Seaweed-X-Amz-ETag";

/// One filer event as posted by the webhook notifier.
#[derive(Debug, Clone, Deserialize)]
pub struct FilerEvent {
    /// `create`, `update`, `delete` or `rename`.
    pub event_type: String,
    /// Full filer path of the entry the event is about.
    pub key: String,
    /// The change.
    pub message: FilerChange,
}

/// The change an event describes.
#[derive(Debug, Clone, Deserialize)]
pub struct FilerChange {
    /// The entry after the change; absent on deletes.
    #[serde(default)]
    pub new_entry: Option<FilerEntry>,
    /// Directory of the new entry.
    #[serde(default)]
    pub new_parent_path: Option<String>,
}

/// A filer entry (file or directory).
#[derive(Debug, Clone, Deserialize)]
pub struct FilerEntry {
    /// Base name.
    pub name: String,
    /// Whether it is a directory.
    #[serde(default)]
    pub is_directory: bool,
    /// Size, MD5 and so on.
    #[serde(default)]
    pub attributes: FilerAttributes,
    /// Extended attributes, base64 values (S3 ETag, user metadata).
    #[serde(default)]
    pub extended: BTreeMap<String, String>,
}

/// The attributes of an entry that matter here.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct FilerAttributes {
    /// Size in bytes.
    #[serde(default)]
    pub file_size: Option<u64>,
    /// MD5 of a single-part upload, base64.
    #[serde(default)]
    pub md5: Option<String>,
}

/// Why an event announces no upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not a create or update.
    NotACreation,
    /// A directory.
    Directory,
    /// Outside `/buckets/`, or SeaweedFS's own bookkeeping (`.system`, `.uploads`, …).
    Internal,
    /// In another bucket than the one watched.
    OtherBucket,
}

impl FilerEvent {
    /// The uploaded object this event announces in `bucket`, or why it announces none.
    ///
    /// The ETag comes from the S3 gateway's `Seaweed-X-Amz-ETag` attribute (the same value S3
    /// listings show, `-N` suffix included for multipart uploads), else from the MD5.
    pub fn uploaded_object(&self, bucket: &str) -> Result<ObjectRef, Skip> {
        if self.event_type != "create" && self.event_type != "update" {
            return Err(Skip::NotACreation);
        }
        let entry = self.message.new_entry.as_ref().ok_or(Skip::NotACreation)?;
        if entry.is_directory {
            return Err(Skip::Directory);
        }
        let path = match &self.message.new_parent_path {
            Some(parent) => format!("{}/{}", parent.trim_end_matches('/'), entry.name),
            None => self.key.clone(),
        };
        let (event_bucket, key) = path
            .strip_prefix(BUCKETS_ROOT)
            .and_then(|rest| rest.split_once('/'))
            .ok_or(Skip::Internal)?;
        if event_bucket.starts_with('.') || key.is_empty() {
            return Err(Skip::Internal);
        }
        if key.split('/').any(|segment| segment.starts_with('.')) {
            // `.uploads/<id>/0001_….part` and friends: parts, not objects.
            return Err(Skip::Internal);
        }
        if event_bucket != bucket {
            return Err(Skip::OtherBucket);
        }
        let etag = entry
            .extended
            .get(ETAG_ATTRIBUTE)
            .and_then(|b64| BASE64.decode(b64).ok())
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .or_else(|| {
                let md5 = BASE64.decode(entry.attributes.md5.as_deref()?).ok()?;
                Some(md5.iter().map(|b| format!("{b:02x}")).collect())
            })
            .map(|etag| darkroom_events::s3::normalize_etag(&etag))
            .filter(|etag| !etag.is_empty());
        Ok(ObjectRef {
            bucket: event_bucket.to_owned(),
            key: key.to_owned(),
            etag,
            version_id: None,
            size: entry.attributes.file_size,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> FilerEvent {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn a_plain_put_becomes_its_object() {
        let object = fixture("seaweedfs_put.json")
            .uploaded_object("photos")
            .unwrap();
        assert_eq!(object.key, "inbox/red flower+1.jpg");
        assert_eq!(
            object.etag.as_deref(),
            Some("5eb63bbbe01eeed093cb22bb8f5acdc3")
        );
        assert_eq!(object.size, Some(11));
    }

    #[test]
    fn a_multipart_upload_keeps_the_s3_etag() {
        let object = fixture("seaweedfs_multipart.json")
            .uploaded_object("photos")
            .unwrap();
        assert_eq!(object.key, "inbox/big.jpg");
        assert_eq!(
            object.etag.as_deref(),
            Some("16cafe8d6b8c1c55c3d339c8d69326c6-2")
        );
    }

    #[test]
    fn parts_directories_and_internal_entries_are_skipped() {
        assert_eq!(
            fixture("seaweedfs_multipart_part.json").uploaded_object("photos"),
            Err(Skip::Internal)
        );
        assert_eq!(
            fixture("seaweedfs_directory.json").uploaded_object("photos"),
            Err(Skip::Directory)
        );
        assert_eq!(
            fixture("seaweedfs_internal_update.json").uploaded_object("photos"),
            Err(Skip::Internal)
        );
        assert_eq!(
            fixture("seaweedfs_put.json").uploaded_object("other"),
            Err(Skip::OtherBucket)
        );
    }

    #[test]
    fn deletes_are_not_uploads() {
        let mut event = fixture("seaweedfs_put.json");
        event.event_type = "delete".to_owned();
        assert_eq!(event.uploaded_object("photos"), Err(Skip::NotACreation));
    }

    #[test]
    fn the_md5_stands_in_when_the_etag_attribute_is_missing() {
        let mut event = fixture("seaweedfs_put.json");
        if let Some(entry) = event.message.new_entry.as_mut() {
            entry.extended.clear();
        }
        let object = event.uploaded_object("photos").unwrap();
        assert_eq!(
            object.etag.as_deref(),
            Some("5eb63bbbe01eeed093cb22bb8f5acdc3")
        );
    }
}
