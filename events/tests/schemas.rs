//! The committed JSON Schemas in `events/schemas/` are exactly what the types generate, and they
//! accept what Darkroom sends and reject what it never would.
//!
//! After changing a payload type, regenerate them with
//! `DARKROOM_BLESS=1 cargo test -p darkroom-events --test schemas` and commit the result.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use darkroom_events::schema::{SCHEMA_DIR, all_schemas, schema_file_name, to_pretty_json};
use darkroom_events::{CloudEvent, EventData, JobCompleted, JobFailed, LifecycleEvent};
use jsonschema::Validator;
use serde_json::{Value, json};

fn schema_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(SCHEMA_DIR)
}

fn blessing() -> bool {
    std::env::var("DARKROOM_BLESS").is_ok_and(|value| value == "1")
}

/// The committed schemas by name, read from disk (not regenerated).
fn committed_schemas() -> BTreeMap<&'static str, Value> {
    all_schemas()
        .into_iter()
        .map(|(name, _)| {
            let path = schema_dir().join(schema_file_name(name));
            let text =
                fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
            (name, serde_json::from_str(&text).unwrap())
        })
        .collect()
}

fn validator(schema: &Value) -> Validator {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(schema)
        .unwrap()
}

fn errors(schema: &Value, instance: &Value) -> Vec<String> {
    validator(schema)
        .iter_errors(instance)
        .map(|error| format!("{} at {}", error, error.instance_path()))
        .collect()
}

#[test]
fn committed_schemas_equal_the_generated_ones() {
    let dir = schema_dir();
    let bless = blessing();
    let generated = all_schemas();
    let mut stale = Vec::new();
    for (name, schema) in &generated {
        let path = dir.join(schema_file_name(name));
        let text = to_pretty_json(schema);
        if fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
            continue;
        }
        if bless {
            fs::create_dir_all(&dir).unwrap();
            fs::write(&path, text).unwrap();
            println!("blessed {}", path.display());
        } else {
            stale.push(path.display().to_string());
        }
    }

    // A schema file no type generates any more is stale too.
    let expected: Vec<String> = generated
        .iter()
        .map(|(name, _)| schema_file_name(name))
        .collect();
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
        if file_name.ends_with(".schema.json") && !expected.contains(&file_name) {
            if bless {
                fs::remove_file(&path).unwrap();
                println!("removed {}", path.display());
            } else {
                stale.push(path.display().to_string());
            }
        }
    }

    assert!(
        stale.is_empty(),
        "schemas out of date: {stale:?}\n\
         regenerate with `DARKROOM_BLESS=1 cargo test -p darkroom-events --test schemas`"
    );
}

#[test]
fn committed_schemas_are_valid_draft_2020_12() {
    for (name, schema) in committed_schemas() {
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{name}"
        );
        if let Err(error) = jsonschema::meta::validate(&schema) {
            panic!("{name}: {error}");
        }
    }
}

#[test]
fn every_event_type_validates() {
    let schemas = committed_schemas();
    let samples = common::sample_events();
    assert_eq!(samples.len() + 1, schemas.len(), "a sample per schema");
    for (name, instance) in samples {
        let found = errors(&schemas[name], &instance);
        assert!(found.is_empty(), "{name}: {found:?}\n{instance:#}");
    }
}

#[test]
fn s3_fixtures_validate() {
    let schema = &committed_schemas()["s3-notification"];
    let dir = common::fixture_path("");
    let mut checked = 0;
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
        // The test event is not a notification; it has no `Records`.
        if !file_name.starts_with("s3_") || file_name.contains("test_event") {
            continue;
        }
        let instance: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let found = errors(schema, &instance);
        assert!(found.is_empty(), "{file_name}: {found:?}");
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} S3 fixtures found");
}

/// A valid sample of `name`, for the negative tests to break.
fn sample(name: &str) -> Value {
    common::sample_events()
        .into_iter()
        .find(|(sample_name, _)| *sample_name == name)
        .unwrap()
        .1
}

#[test]
fn wrong_instances_are_rejected() {
    let schemas = committed_schemas();
    let mut cases: Vec<(&str, &str, Value)> = Vec::new();

    let mut instance = sample(JobFailed::SCHEMA_NAME);
    instance["data"].as_object_mut().unwrap().remove("reason");
    cases.push(("missing reason", JobFailed::SCHEMA_NAME, instance));

    let mut instance = sample(JobFailed::SCHEMA_NAME);
    instance["data"]["reason"] = json!("gpu_on_fire");
    cases.push(("unknown reason", JobFailed::SCHEMA_NAME, instance));

    let mut instance = sample(JobFailed::SCHEMA_NAME);
    instance["data"]["stage"] = json!("Preprocess");
    cases.push(("stage not in snake case", JobFailed::SCHEMA_NAME, instance));

    let mut instance = sample(JobCompleted::SCHEMA_NAME);
    instance["type"] = json!(JobFailed::TYPE);
    cases.push(("type of another event", JobCompleted::SCHEMA_NAME, instance));

    let mut instance = sample(JobCompleted::SCHEMA_NAME);
    instance["specversion"] = json!("0.3");
    cases.push(("old specversion", JobCompleted::SCHEMA_NAME, instance));

    let mut instance = sample(JobCompleted::SCHEMA_NAME);
    instance.as_object_mut().unwrap().remove("data");
    cases.push(("no data", JobCompleted::SCHEMA_NAME, instance));

    let mut instance = sample(JobCompleted::SCHEMA_NAME);
    instance["data"]["job_id"] = json!("not-a-uuid");
    cases.push(("job id not a UUID", JobCompleted::SCHEMA_NAME, instance));

    let mut instance = sample(JobCompleted::SCHEMA_NAME);
    instance["time"] = json!("yesterday");
    cases.push(("time not RFC 3339", JobCompleted::SCHEMA_NAME, instance));

    let mut instance = sample("job-progress");
    instance["data"]["step"] = json!(-1);
    cases.push(("negative step", "job-progress", instance));

    let mut instance = sample("inference-job");
    instance["data"]["source"]
        .as_object_mut()
        .unwrap()
        .remove("key");
    cases.push(("source without key", "inference-job", instance));

    let mut instance: Value =
        serde_json::from_str(&fs::read_to_string(common::fixture_path("s3_aws_put.json")).unwrap())
            .unwrap();
    instance["Records"][0]
        .as_object_mut()
        .unwrap()
        .remove("eventName");
    cases.push(("record without eventName", "s3-notification", instance));

    cases.push((
        "test event is not a notification",
        "s3-notification",
        serde_json::from_str(
            &fs::read_to_string(common::fixture_path("s3_aws_test_event.json")).unwrap(),
        )
        .unwrap(),
    ));

    for (what, name, instance) in cases {
        assert!(
            !validator(&schemas[name]).is_valid(&instance),
            "{what}: {name} accepted\n{instance:#}"
        );
    }
}

/// Every ` ```json ` block of `events/README.md` that is a CloudEvent parses as the type it names
/// and validates against that type's schema, so the examples cannot drift from the code.
#[test]
fn readme_examples_are_valid_events() {
    fn check<T: LifecycleEvent>(text: &str, schemas: &BTreeMap<&'static str, Value>) {
        let event = CloudEvent::<T>::from_json(text.as_bytes()).unwrap();
        let job = event.data.job_id();
        assert_eq!(event.subject, Some(job.to_string()), "{}", T::TYPE);
        assert_eq!(
            event.id,
            job.derived_id(&event.data.dedup_label()).to_string(),
            "{}",
            T::TYPE
        );
        let instance: Value = serde_json::from_str(text).unwrap();
        let found = errors(&schemas[T::SCHEMA_NAME], &instance);
        assert!(found.is_empty(), "{}: {found:?}", T::SCHEMA_NAME);
    }

    let readme =
        fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let schemas = committed_schemas();
    let mut checked = Vec::new();
    for block in readme.split("```json\n").skip(1) {
        let text = block.split("```").next().unwrap();
        let value: Value = serde_json::from_str(text)
            .unwrap_or_else(|err| panic!("README JSON block does not parse: {err}\n{text}"));
        let Some(event_type) = value.get("type").and_then(Value::as_str) else {
            continue;
        };
        match event_type {
            JobCompleted::TYPE => check::<JobCompleted>(text, &schemas),
            JobFailed::TYPE => check::<JobFailed>(text, &schemas),
            other => panic!("README example of unexpected type {other}"),
        }
        checked.push(event_type.to_owned());
    }
    assert!(checked.contains(&JobCompleted::TYPE.to_owned()));
    assert!(checked.contains(&JobFailed::TYPE.to_owned()));
}
