//! Realistic payloads from each S3 server Darkroom supports parse into the same object
//! references and job ids, survive a serialise/parse round trip, and Darkroom's own CloudEvents
//! round-trip and are checked on the way in.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;

use darkroom_events::s3::{S3EventRecord, S3Message, S3Notification, parse_s3_message};
use darkroom_events::{
    CloudEvent, EventData, EventError, InferenceJob, JobCompleted, JobFailed, JobId, JobProgress,
    JobQueued, JobStarted, ObjectRef,
};

fn fixture(name: &str) -> Vec<u8> {
    let path = common::fixture_path(name);
    fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// The single record of a fixture, checking that it also round-trips.
fn single_record(name: &str) -> S3EventRecord {
    let bytes = fixture(name);
    let S3Message::Records(records) = parse_s3_message(&bytes).unwrap() else {
        panic!("{name} parsed as a test event");
    };
    assert_round_trip(&records);
    assert_eq!(records.len(), 1, "{name}");
    records.into_iter().next().unwrap()
}

/// Serialising parsed records and parsing them again gives the same records.
fn assert_round_trip(records: &[S3EventRecord]) {
    let notification = S3Notification {
        records: records.to_vec(),
    };
    let bytes = serde_json::to_vec(&notification).unwrap();
    match parse_s3_message(&bytes).unwrap() {
        S3Message::Records(again) => assert_eq!(again, records),
        S3Message::TestEvent => panic!("re-parsed as a test event"),
    }
    let again: S3Notification = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(again, notification);
}

#[test]
fn aws_put() {
    let record = single_record("s3_aws_put.json");
    assert!(record.is_object_created());
    assert_eq!(record.event_version, "2.1");
    assert_eq!(record.aws_region, "eu-west-1");
    assert_eq!(
        record.s3.object.key,
        "inbox/profile-warm/red+flower%2B1.jpg"
    );
    assert_eq!(
        record
            .s3
            .bucket
            .owner_identity
            .as_ref()
            .unwrap()
            .principal_id,
        "A3NL1KOZZKExample"
    );
    assert_eq!(record.request_parameters["sourceIPAddress"], "203.0.113.24");

    let object = record.object_ref().unwrap();
    assert_eq!(
        object,
        ObjectRef {
            bucket: "darkroom-photos".to_owned(),
            key: "inbox/profile-warm/red flower+1.jpg".to_owned(),
            etag: Some("9b2cf535f27731c974343645a3985328".to_owned()),
            version_id: Some("096fKKXTRTtl3on89fVO.nfljtsv6qko".to_owned()),
            size: Some(2_481_337),
        }
    );
    assert_eq!(
        object.job_id(),
        Some(JobId::for_object(
            "darkroom-photos",
            "inbox/profile-warm/red flower+1.jpg",
            "\"9B2CF535F27731C974343645A3985328\""
        ))
    );
}

#[test]
fn aws_multipart_upload_keeps_its_part_count() {
    let record = single_record("s3_aws_multipart.json");
    assert!(record.is_object_created());
    assert_eq!(record.event_name, "ObjectCreated:CompleteMultipartUpload");
    let object = record.object_ref().unwrap();
    assert_eq!(object.bucket, "studio.photos");
    assert_eq!(object.key, "inbox/storybook/IMG_0042.HEIC");
    assert_eq!(
        object.etag.as_deref(),
        Some("d41d8cd98f00b204e9800998ecf8427e-3")
    );
    assert_eq!(object.version_id, None);
    assert_eq!(object.size, Some(18_874_368));
    // Quoted upper case in the event, plain lower case from a listing: one job.
    assert_eq!(
        object.job_id(),
        Some(JobId::for_object(
            "studio.photos",
            "inbox/storybook/IMG_0042.HEIC",
            "d41d8cd98f00b204e9800998ecf8427e-3"
        ))
    );
}

#[test]
fn aws_test_event_is_not_work() {
    assert_eq!(
        parse_s3_message(&fixture("s3_aws_test_event.json")).unwrap(),
        S3Message::TestEvent
    );
}

#[test]
fn minio_put_decodes_encoded_slashes_and_utf8() {
    let record = single_record("s3_minio_put.json");
    assert!(record.is_object_created());
    assert_eq!(record.event_source, "minio:s3");
    assert_eq!(record.event_version, "2.0");
    assert_eq!(record.aws_region, "");
    assert_eq!(
        record.response_elements["x-minio-deployment-id"],
        "6f1c2a8e-4b3d-4e9a-9c7f-2d5b8a1e0c34"
    );
    assert_eq!(record.s3.object.content_type.as_deref(), Some("image/png"));
    assert_eq!(
        record.s3.object.user_metadata["X-Amz-Meta-Darkroom-Client"],
        "ios/2.3.1"
    );

    let object = record.object_ref().unwrap();
    assert_eq!(object.bucket, "photos");
    assert_eq!(object.key, "inbox/profile-cool/日本/é.png");
    assert_eq!(
        object.etag.as_deref(),
        Some("e66a43b7c1b5d2a9f07d3c8e51b4a290")
    );
    assert_eq!(object.version_id, None);
    assert_eq!(object.size, Some(734_003));
}

#[test]
fn rustfs_put_without_optional_fields() {
    let record = single_record("s3_rustfs_put.json");
    assert!(record.is_object_created());
    assert_eq!(record.event_source, "rustfs:s3");
    assert_eq!(record.aws_region, "");
    assert!(record.response_elements.is_empty());
    assert_eq!(record.s3.configuration_id, None);
    assert_eq!(record.s3.bucket.owner_identity, None);
    assert_eq!(record.s3.object.sequencer, None);

    let object = record.object_ref().unwrap();
    assert_eq!(object.key, "inbox/desk-setup/desk photo.jpeg");
    assert_eq!(
        object.etag.as_deref(),
        Some("0cc175b9c0f1b6a831c399e269772661")
    );
    assert_eq!(
        object.job_id(),
        Some(JobId::for_object(
            "photos",
            "inbox/desk-setup/desk photo.jpeg",
            "0cc175b9c0f1b6a831c399e269772661"
        ))
    );
}

#[test]
fn delete_is_not_a_new_object() {
    let record = single_record("s3_aws_delete.json");
    assert!(!record.is_object_created());
    assert_eq!(record.event_name, "ObjectRemoved:Delete");
    let object = record.object_ref().unwrap();
    assert_eq!(object.key, "inbox/profile-warm/red flower+1.jpg");
    assert_eq!(object.etag, None);
    assert_eq!(object.size, None);
    assert_eq!(object.job_id(), None);
}

#[test]
fn same_object_from_aws_and_darkroom_ingest_is_one_job() {
    let aws = single_record("s3_aws_put.json").object_ref().unwrap();

    // Darkroom's own producers (SeaweedFS adapter, reconciler) re-encode the key and may
    // carry the ETag quoted; the job must not change.
    let quoted = ObjectRef {
        etag: Some("\"9B2CF535F27731C974343645A3985328\"".to_owned()),
        version_id: None,
        ..aws.clone()
    };
    let record = S3EventRecord::object_created("darkroom:reconciler", &quoted, None);
    assert_eq!(
        record.s3.object.key,
        "inbox/profile-warm/red+flower%2B1.jpg"
    );
    assert_round_trip(std::slice::from_ref(&record));
    let reparsed = record.object_ref().unwrap();
    assert_eq!(reparsed.key, aws.key);
    assert_eq!(reparsed.etag, aws.etag);
    assert_eq!(reparsed.job_id(), aws.job_id());
    assert!(aws.job_id().is_some());
}

#[test]
fn batched_records_parse_in_order() {
    let mut records = Vec::new();
    for name in ["s3_aws_put.json", "s3_minio_put.json", "s3_aws_delete.json"] {
        records.push(single_record(name));
    }
    let bytes = serde_json::to_vec(&S3Notification {
        records: records.clone(),
    })
    .unwrap();
    assert_eq!(
        parse_s3_message(&bytes).unwrap(),
        S3Message::Records(records)
    );
}

/// The test vectors in `events/README.md`, which clients in other languages check against.
#[test]
fn job_id_test_vectors() {
    let job = JobId::for_object(
        "photos",
        "inbox/profile-warm/red flower+1.jpg",
        "9b2cf535f27731c974343645a3985328",
    );
    assert_eq!(job.to_string(), "57e04871-ece8-5e29-b8ec-ddd0b120d0fb");
    assert_eq!(job, common::job_id());
    assert_eq!(
        job.derived_id("completed").to_string(),
        "0ec57537-bd70-58a8-a1bd-91b1fc1ee2a8"
    );
    assert_eq!(
        job.derived_id("progress.7").to_string(),
        "209463f0-ec9d-59fc-91e1-b791ea5f270d"
    );
    assert_eq!(
        JobId::for_object(
            "photos",
            "inbox/profile-cool/日本/é.png",
            "\"E66A43B7C1B5D2A9F07D3C8E51B4A290\""
        )
        .to_string(),
        "0b132f1e-56df-5885-aab4-2f81ed1fa15a"
    );
    assert_eq!(
        single_record("s3_minio_put.json")
            .object_ref()
            .unwrap()
            .job_id()
            .unwrap()
            .to_string(),
        "0b132f1e-56df-5885-aab4-2f81ed1fa15a"
    );
    assert_eq!(
        single_record("s3_aws_multipart.json")
            .object_ref()
            .unwrap()
            .job_id()
            .unwrap()
            .to_string(),
        "bc3f8e3c-1c23-56aa-9041-32a221276928"
    );
}

fn assert_cloudevent_round_trip<T>(event: CloudEvent<T>)
where
    T: EventData + PartialEq + std::fmt::Debug,
{
    let bytes = event.to_json();
    let again = CloudEvent::<T>::from_json(&bytes).unwrap();
    assert_eq!(again, event);
    assert_eq!(again.event_type, T::TYPE);
    assert_eq!(again.to_json(), bytes);
}

#[test]
fn every_cloudevent_round_trips() {
    assert_cloudevent_round_trip(common::inference_job_event());
    assert_cloudevent_round_trip(common::lifecycle_event(
        "/darkroom/preprocess",
        common::queued(),
    ));
    assert_cloudevent_round_trip(common::lifecycle_event(
        "/darkroom/inference",
        common::started(),
    ));
    assert_cloudevent_round_trip(common::lifecycle_event(
        "/darkroom/inference",
        common::progress(),
    ));
    assert_cloudevent_round_trip(common::lifecycle_event(
        "/darkroom/inference",
        common::completed(),
    ));
    assert_cloudevent_round_trip(common::lifecycle_event(
        "/darkroom/preprocess",
        common::failed(),
    ));
    // Optional attributes left out.
    assert_cloudevent_round_trip(CloudEvent::new("1", "/darkroom/test", common::failed()));
    let mut failed = common::failed();
    failed.source = None;
    assert_cloudevent_round_trip(CloudEvent::new("2", "/darkroom/test", failed));
}

#[test]
fn lifecycle_event_ids_are_deterministic() {
    let a = common::lifecycle_event("/darkroom/inference", common::progress());
    let b = common::lifecycle_event("/darkroom/inference", common::progress());
    assert_eq!(a.id, b.id);
    let mut later = common::progress();
    later.step += 1;
    assert_ne!(
        a.id,
        common::lifecycle_event("/darkroom/inference", later).id
    );
    assert_ne!(
        common::lifecycle_event("/darkroom/inference", common::completed()).id,
        common::lifecycle_event("/darkroom/inference", common::failed()).id
    );
}

#[test]
fn from_json_rejects_another_type() {
    let completed = common::lifecycle_event("/darkroom/inference", common::completed()).to_json();
    match CloudEvent::<JobFailed>::from_json(&completed) {
        Err(EventError::WrongType { expected, found }) => {
            assert_eq!(expected, JobFailed::TYPE);
            assert_eq!(found, JobCompleted::TYPE);
        }
        other => panic!("expected WrongType, got {other:?}"),
    }
    // Same for each pair of distinct types: a reader only takes its own.
    let queued = common::lifecycle_event("/darkroom/preprocess", common::queued()).to_json();
    assert!(matches!(
        CloudEvent::<JobStarted>::from_json(&queued),
        Err(EventError::WrongType { .. })
    ));
    assert!(matches!(
        CloudEvent::<JobProgress>::from_json(&queued),
        Err(EventError::WrongType { .. })
    ));
    assert!(matches!(
        CloudEvent::<InferenceJob>::from_json(&queued),
        Err(EventError::WrongType { .. })
    ));
    assert!(CloudEvent::<JobQueued>::from_json(&queued).is_ok());
}

#[test]
fn from_json_rejects_another_specversion() {
    let event = common::lifecycle_event("/darkroom/inference", common::completed());
    let mut value: serde_json::Value = serde_json::from_slice(&event.to_json()).unwrap();
    value["specversion"] = serde_json::json!("0.3");
    let bytes = serde_json::to_vec(&value).unwrap();
    match CloudEvent::<JobCompleted>::from_json(&bytes) {
        Err(EventError::SpecVersion { found }) => assert_eq!(found, "0.3"),
        other => panic!("expected SpecVersion, got {other:?}"),
    }
}

#[test]
fn from_json_rejects_malformed_envelopes() {
    let event = common::lifecycle_event("/darkroom/inference", common::completed());
    let mut value: serde_json::Value = serde_json::from_slice(&event.to_json()).unwrap();
    value["data"].as_object_mut().unwrap().remove("result");
    let bytes = serde_json::to_vec(&value).unwrap();
    assert!(matches!(
        CloudEvent::<JobCompleted>::from_json(&bytes),
        Err(EventError::Json(_))
    ));
    assert!(matches!(
        CloudEvent::<JobCompleted>::from_json(b"{\"data\":{}}"),
        Err(EventError::Json(_))
    ));
    assert!(matches!(
        CloudEvent::<JobCompleted>::from_json(b"\x00"),
        Err(EventError::Json(_))
    ));
}
