//! Sample payloads shared by the integration tests: one of every event type, all about the same
//! job, the way the pipeline would emit them.

#![allow(dead_code)]

use std::path::PathBuf;

use darkroom_events::job::{ControlImage, ControlNetParams, RenderParams, ToneParams};
use darkroom_events::{
    AdapterUsed, CloudEvent, EventData, FailureReason, InferenceJob, JobCompleted, JobFailed,
    JobId, JobProgress, JobQueued, JobStarted, LifecycleEvent, ModelUsed, ObjectRef, Stage,
    StageTimings,
};

/// `events/tests/fixtures/<name>`.
pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// The upload every sample is about.
pub fn upload() -> ObjectRef {
    ObjectRef {
        bucket: "photos".to_owned(),
        key: "inbox/profile-warm/red flower+1.jpg".to_owned(),
        etag: Some("9b2cf535f27731c974343645a3985328".to_owned()),
        version_id: None,
        size: Some(2_481_337),
    }
}

/// The sample job's id.
pub fn job_id() -> JobId {
    upload().job_id().expect("the sample upload has an ETag")
}

pub fn inference_job() -> InferenceJob {
    let job = job_id();
    InferenceJob {
        job_id: job,
        source: upload(),
        preset: "profile-warm".to_owned(),
        init_image_key: format!("work/{job}/input.png"),
        control_images: vec![ControlImage {
            kind: "canny".to_owned(),
            key: format!("work/{job}/control-canny.png"),
        }],
        width: 832,
        height: 1216,
        seed: 1_234_567_890_123,
        output_prefix: format!("outputs/{job}/"),
        render: RenderParams {
            prompt: "professional studio headshot of the subject of the photo, soft key light"
                .to_owned(),
            negative_prompt: "blurry, distorted face".to_owned(),
            steps: 30,
            guidance: 5.0,
            scheduler: "dpmpp-2m-karras".to_owned(),
            strength: Some(0.55),
            loras: Vec::new(),
            controlnets: vec![ControlNetParams {
                kind: "canny".to_owned(),
                model: "controlnet-canny-sdxl-1.0".to_owned(),
                scale: 0.6,
                start: 0.0,
                end: 0.8,
            }],
            tone: Some(ToneParams {
                temperature_k: 5200.0,
                tint: 0.02,
                strength: 0.8,
                lut: None,
            }),
        },
    }
}

pub fn queued() -> JobQueued {
    JobQueued {
        job_id: job_id(),
        source: upload(),
        preset: "profile-warm".to_owned(),
    }
}

pub fn started() -> JobStarted {
    JobStarted {
        job_id: job_id(),
        worker: "gpu-worker-0".to_owned(),
        attempt: 1,
    }
}

pub fn progress() -> JobProgress {
    JobProgress {
        job_id: job_id(),
        step: 7,
        total_steps: 30,
    }
}

pub fn completed() -> JobCompleted {
    let job = job_id();
    JobCompleted {
        job_id: job,
        source: upload(),
        preset: "profile-warm".to_owned(),
        result: ObjectRef {
            etag: Some("5d41402abc4b2a76b9719d911017c592".to_owned()),
            size: Some(1_804_220),
            ..ObjectRef::new("photos", format!("outputs/{job}/result.png"))
        },
        metadata: ObjectRef::new("photos", format!("outputs/{job}/job.json")),
        seed: 4_242_424_242,
        model: ModelUsed {
            name: "sdxl-base-1.0".to_owned(),
            sha256: "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b".to_owned(),
        },
        loras: Vec::new(),
        controlnets: vec![AdapterUsed {
            name: "controlnet-canny-sdxl-1.0".to_owned(),
            sha256: "a8b4ec8d2d4ab4c1eaa1d6d4dc3f50a8a9bbbe4f6a5d4c8c86b2e2fb0a1e1b7c".to_owned(),
            weight: 0.6,
        }],
        worker: "gpu-0".to_owned(),
        attempt: 1,
        total_ms: 14_250,
        inference_ms: 9_870,
        timings: StageTimings {
            fetch_ms: 40,
            adapters_ms: 0,
            text_ms: 30,
            prepare_ms: 120,
            denoise_ms: 9_200,
            decode_ms: 300,
            finish_ms: 130,
            store_ms: 50,
        },
    }
}

pub fn failed() -> JobFailed {
    JobFailed {
        job_id: job_id(),
        stage: Stage::Preprocess,
        reason: FailureReason::NoFaceFound,
        message: "preset profile-warm needs a face and none was found".to_owned(),
        attempts: 1,
        source: Some(upload()),
    }
}

/// Wraps a lifecycle payload as its producer would: deterministic id, job as subject.
pub fn lifecycle_event<T: LifecycleEvent>(source: &str, data: T) -> CloudEvent<T> {
    let job = data.job_id();
    CloudEvent::new(
        job.derived_id(&data.dedup_label()).to_string(),
        source,
        data,
    )
    .with_subject(job.to_string())
    .with_traceparent(Some(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
    ))
}

/// The envelope of the sample inference job.
pub fn inference_job_event() -> CloudEvent<InferenceJob> {
    let data = inference_job();
    let job = data.job_id;
    CloudEvent::new(
        job.derived_id("inference").to_string(),
        "/darkroom/preprocess",
        data,
    )
    .with_subject(job.to_string())
}

/// A serialized sample of every event type, as `(schema name, JSON)`.
pub fn sample_events() -> Vec<(&'static str, serde_json::Value)> {
    fn json<T: EventData>(event: &CloudEvent<T>) -> (&'static str, serde_json::Value) {
        let value = serde_json::from_slice(&event.to_json()).expect("to_json writes JSON");
        (T::SCHEMA_NAME, value)
    }
    vec![
        json(&inference_job_event()),
        json(&lifecycle_event("/darkroom/preprocess", queued())),
        json(&lifecycle_event("/darkroom/inference", started())),
        json(&lifecycle_event("/darkroom/inference", progress())),
        json(&lifecycle_event("/darkroom/inference", completed())),
        json(&lifecycle_event("/darkroom/preprocess", failed())),
    ]
}
