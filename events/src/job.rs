//! Job identity, object references and the inference work item.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::cloudevent::EventData;

/// Namespace of job ids (UUID v5). Changing it would give every upload a new job id.
const JOB_NAMESPACE: Uuid = Uuid::from_u128(0x50901d01_cef5_41ff_8ffb_9abcabd18a23);

/// A job's id: UUID v5 over the uploaded object's bucket, key and ETag.
///
/// The same upload always maps to the same job however often (and by whichever route) its
/// event arrives, which is what makes every stage idempotent. The ETag is used rather than the
/// version id because listings (the reconciler) and every event source carry it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct JobId(pub Uuid);

impl JobId {
    /// The job id of an uploaded object.
    pub fn for_object(bucket: &str, key: &str, etag: &str) -> Self {
        // A JSON array keeps the three parts unambiguous whatever characters they contain.
        let name = serde_json::json!([bucket, key, crate::s3::normalize_etag(etag)]).to_string();
        JobId(Uuid::new_v5(&JOB_NAMESPACE, name.as_bytes()))
    }

    /// A deterministic id derived from this job and a label (`completed`, `progress.7`): used as
    /// CloudEvent id and `Nats-Msg-Id`, so a re-sent event is recognisably the same event.
    pub fn derived_id(&self, label: &str) -> Uuid {
        Uuid::new_v5(&self.0, label.as_bytes())
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.as_hyphenated().fmt(f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(JobId)
    }
}

/// An object in a bucket, as events refer to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ObjectRef {
    /// Bucket name.
    pub bucket: String,
    /// Object key, decoded (`inbox/red flower+1.jpg`).
    pub key: String,
    /// ETag without quotes, lower case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Version id, on versioned buckets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    /// Size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

impl ObjectRef {
    /// A reference with only bucket and key.
    pub fn new(bucket: impl Into<String>, key: impl Into<String>) -> Self {
        ObjectRef {
            bucket: bucket.into(),
            key: key.into(),
            etag: None,
            version_id: None,
            size: None,
        }
    }

    /// The job this object maps to, once its ETag is known.
    pub fn job_id(&self) -> Option<JobId> {
        self.etag
            .as_deref()
            .map(|etag| JobId::for_object(&self.bucket, &self.key, etag))
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// A control image prepared for a ControlNet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ControlImage {
    /// Kind of control map (`canny`, `depth`, `pose`).
    pub kind: String,
    /// Key of the prepared map in the job's bucket (`work/<job>/control-canny.png`).
    pub key: String,
}

/// Work for the GPU: one prepared photo and everything needed to render it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InferenceJob {
    /// The job.
    pub job_id: JobId,
    /// The upload the job came from.
    pub source: ObjectRef,
    /// Preset name (`profile-warm`, `storybook`, …).
    pub preset: String,
    /// Key of the prepared init image (`work/<job>/input.png`), in the source bucket.
    pub init_image_key: String,
    /// Prepared control maps, one per ControlNet kind the preset uses.
    #[serde(default)]
    pub control_images: Vec<ControlImage>,
    /// Output width in pixels (a multiple of 64 in SDXL's resolution buckets).
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// Seed of the noise, fixed per job so a redelivered job renders the same picture.
    pub seed: u64,
    /// Key prefix results are written under (`outputs/<job>/`).
    pub output_prefix: String,
    /// The preset resolved to concrete values when the job was made.
    pub render: RenderParams,
}

/// How to render a job: its preset resolved to concrete values by preprocess, so the GPU
/// worker needs no preset files and editing a preset never changes a job already queued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RenderParams {
    /// The prompt, its `{subject}` placeholder already replaced.
    pub prompt: String,
    /// The negative prompt (may be empty).
    #[serde(default)]
    pub negative_prompt: String,
    /// Denoising steps.
    pub steps: u32,
    /// Classifier-free guidance scale.
    pub guidance: f64,
    /// Scheduler: `euler`, `euler-a`, `dpmpp-2m-karras` or `ddim`.
    pub scheduler: String,
    /// Image-to-image strength in (0, 1]; absent means text-to-image (the init image then
    /// only framed the job and fed the control maps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// LoRAs to apply, in order.
    #[serde(default)]
    pub loras: Vec<LoraParams>,
    /// ControlNets to apply; each reads the control image of its `kind`.
    #[serde(default)]
    pub controlnets: Vec<ControlNetParams>,
    /// Colour post-process, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tone: Option<ToneParams>,
}

/// A LoRA adapter and its scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LoraParams {
    /// File name, resolved under the worker's LoRA directory.
    pub name: String,
    /// Scale.
    pub weight: f64,
}

/// A ControlNet, its scale and the fraction of the steps it acts in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ControlNetParams {
    /// Kind of control map it reads (a [`ControlImage::kind`] of the same job).
    pub kind: String,
    /// Folder name, resolved under the worker's ControlNet directory.
    pub model: String,
    /// Conditioning scale.
    pub scale: f64,
    /// Fraction of the steps at which it starts, in [0, end).
    pub start: f64,
    /// Fraction of the steps at which it stops, in (start, 1].
    pub end: f64,
}

/// Colour temperature and tint in linear light, then an optional LUT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToneParams {
    /// Target white point in kelvin (below 6500 warms, above cools).
    pub temperature_k: f64,
    /// Green (−) / magenta (+) shift, −1 to 1.
    pub tint: f64,
    /// Blend of the toned image over the untoned one, 0–1.
    pub strength: f64,
    /// A `.cube` LUT file name, resolved under the worker's LUT directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lut: Option<String>,
}

impl EventData for InferenceJob {
    const TYPE: &'static str = "studio.darkroom.job.inference.v1";
    const SCHEMA_NAME: &'static str = "inference-job";
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn job_id_is_stable_and_etag_quoting_does_not_matter() {
        let a = JobId::for_object("photos", "inbox/a.jpg", "\"ABC\"");
        let b = JobId::for_object("photos", "inbox/a.jpg", "abc");
        assert_eq!(a, b);
        assert_eq!(a.0.get_version_num(), 5);
        assert_ne!(a, JobId::for_object("photos", "inbox/a.jpg", "abd"));
        assert_ne!(a, JobId::for_object("photos", "inbox/b.jpg", "abc"));
        // Parts cannot bleed into each other.
        assert_ne!(
            JobId::for_object("a", "b/c", "e"),
            JobId::for_object("a/b", "c", "e")
        );
    }

    #[test]
    fn job_id_parses_from_its_display() {
        let id = JobId::for_object("photos", "inbox/日本/é.png", "e1");
        assert_eq!(id.to_string().parse::<JobId>().unwrap(), id);
    }
}
