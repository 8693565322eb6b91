//! JSON Schemas (draft 2020-12) of every payload on the bus, generated from the types with
//! [`schemars`].
//!
//! The committed copies in `events/schemas/<name>.schema.json` are what clients in other
//! languages read; `tests/schemas.rs` fails when they drift from the types, and rewrites them
//! when run with `DARKROOM_BLESS=1`.
//!
//! Darkroom's own events are described as the whole [`CloudEvent`] envelope, with `specversion`,
//! `type` and `datacontenttype` pinned to the values Darkroom writes, so a validator rejects an
//! event of the wrong type as well as a malformed payload.

use schemars::SchemaGenerator;
use serde_json::Value;

use crate::cloudevent::{CloudEvent, EventData, SPEC_VERSION};
use crate::job::InferenceJob;
use crate::lifecycle::{JobCompleted, JobFailed, JobProgress, JobQueued, JobStarted};
use crate::s3::S3Notification;

/// Name (file stem) of the S3 notification schema.
pub const S3_NOTIFICATION_SCHEMA_NAME: &str = "s3-notification";

/// Directory of the committed schemas, relative to the crate root.
pub const SCHEMA_DIR: &str = "schemas";

/// Every schema Darkroom publishes, as `(name, schema)`: the S3 notification on the uploads
/// stream, then the CloudEvent envelope of each [`EventData`] type, named by
/// [`EventData::SCHEMA_NAME`].
pub fn all_schemas() -> Vec<(&'static str, Value)> {
    vec![
        (S3_NOTIFICATION_SCHEMA_NAME, s3_notification_schema()),
        (
            InferenceJob::SCHEMA_NAME,
            cloudevent_schema::<InferenceJob>(),
        ),
        (JobQueued::SCHEMA_NAME, cloudevent_schema::<JobQueued>()),
        (JobStarted::SCHEMA_NAME, cloudevent_schema::<JobStarted>()),
        (JobProgress::SCHEMA_NAME, cloudevent_schema::<JobProgress>()),
        (
            JobCompleted::SCHEMA_NAME,
            cloudevent_schema::<JobCompleted>(),
        ),
        (JobFailed::SCHEMA_NAME, cloudevent_schema::<JobFailed>()),
    ]
}

/// Schema of [`S3Notification`], the payload of the uploads stream.
pub fn s3_notification_schema() -> Value {
    let mut schema = SchemaGenerator::default()
        .into_root_schema_for::<S3Notification>()
        .to_value();
    // Sorted for the same reason as in `cloudevent_schema`.
    schema.sort_all_objects();
    schema
}

/// Schema of a [`CloudEvent`] carrying `T`, with the envelope's fixed attributes pinned.
pub fn cloudevent_schema<T: EventData>() -> Value {
    let mut schema = SchemaGenerator::default()
        .into_root_schema_for::<CloudEvent<T>>()
        .to_value();
    if let Some(object) = schema.as_object_mut() {
        // The generated title and description speak of the generic `CloudEvent<T>`.
        object.insert("title".to_owned(), Value::from(T::TYPE));
        object.insert(
            "description".to_owned(),
            Value::from(format!(
                "A `{}` event: CloudEvents 1.0, JSON structured mode, `data` a `{}`.",
                T::TYPE,
                T::schema_name()
            )),
        );
    }
    if let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        for (name, value) in [
            ("specversion", SPEC_VERSION),
            ("type", T::TYPE),
            ("datacontenttype", "application/json"),
        ] {
            if let Some(property) = properties.get_mut(name).and_then(Value::as_object_mut) {
                property.insert("const".to_owned(), Value::from(value));
            }
        }
    }
    // Key order must not depend on whether something else in the build enables serde_json's
    // `preserve_order`, or the committed files would flip between builds.
    schema.sort_all_objects();
    schema
}

/// File name of a schema in [`SCHEMA_DIR`]: `<name>.schema.json`.
pub fn schema_file_name(name: &str) -> String {
    format!("{name}.schema.json")
}

/// A schema as it is committed: pretty JSON (two-space indent) and a trailing newline.
pub fn to_pretty_json(schema: &Value) -> String {
    let mut text =
        serde_json::to_string_pretty(schema).expect("a JSON value with string keys serialises");
    text.push('\n');
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_envelopes_pin_their_type() {
        let schemas = all_schemas();
        let mut names: Vec<_> = schemas.iter().map(|(name, _)| *name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), schemas.len());

        let completed = cloudevent_schema::<JobCompleted>();
        assert_eq!(
            completed["properties"]["type"]["const"],
            "studio.darkroom.job.completed.v1"
        );
        assert_eq!(completed["properties"]["specversion"]["const"], "1.0");
        assert!(
            completed["required"]
                .as_array()
                .unwrap()
                .contains(&Value::from("data"))
        );
    }

    #[test]
    fn files_end_with_a_newline() {
        let text = to_pretty_json(&s3_notification_schema());
        assert!(text.ends_with("}\n"));
        assert_eq!(schema_file_name("job-failed"), "job-failed.schema.json");
    }
}
