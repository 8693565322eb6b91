//! From an upload and a preset to a job: which preset, which pipeline options, which files,
//! and the [`InferenceJob`] that tells the GPU worker where they are and how to render.
//!
//! Pure and synchronous: the S3/NATS [`handler`](crate::handler) and the `local` command
//! both use it, so a local run writes exactly what the function would upload and publish.
//!
//! # Which preset
//!
//! In order: the object's `x-amz-meta-preset` metadata; else the first path segment under
//! the inbox prefix (`inbox/<preset>/<file>`, any depth below it); else the configured
//! default preset. None of these, or a name the preset library does not hold, fails the
//! job with `unknown_preset`.
//!
//! # What is written
//!
//! Under `work/<job>/` in the upload's bucket: `input.png` (the prepared image) and one
//! `control-<kind>.png` per ControlNet kind of the preset, all PNGs re-encoded from pixels
//! with no metadata ([`encode_png`]). The result goes under `outputs/<job>/`.

use darkroom_events::{
    ControlImage, ControlNetParams, FailureReason, InferenceJob, JobId, LoraParams, ObjectRef,
    RenderParams, ToneParams,
};
pub use darkroom_shared::preset::MAX_SUBJECT_CHARS;
use darkroom_shared::preset::{ControlKind, Preset, PresetError, Resolution, clean_subject};

use crate::config::PreprocessConfig;
use crate::frame::{FaceOptions, PORTRAIT_BUCKET};
use crate::{Bucket, PrepareOptions, Prepared, PreprocessError, encode_png};

/// Metadata key (`x-amz-meta-preset`) naming the preset, overriding the key's.
pub const PRESET_METADATA: &str = "preset";
/// Metadata key (`x-amz-meta-subject`) whose value replaces a prompt's `{subject}`.
pub const SUBJECT_METADATA: &str = "subject";

/// Why a job cannot be made. All permanent.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// The upload names no preset and no default is configured.
    #[error(
        "no preset: upload under <inbox>/<preset>/ or set x-amz-meta-preset (no default preset is configured)"
    )]
    NoPreset,
    /// The preset is unknown, or the operator's preset files are broken.
    #[error(transparent)]
    Preset(#[from] PresetError),
    /// The upload was refused by the pipeline.
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
}

impl JobError {
    /// The reason code of the `failed` event this error produces.
    pub fn reason(&self) -> FailureReason {
        match self {
            JobError::NoPreset => FailureReason::UnknownPreset,
            JobError::Preset(error) => error.reason(),
            JobError::Preprocess(error) => error.reason(),
        }
    }
}

/// The preset an upload asks for (see the module docs), or `None` when it names none.
pub fn preset_name<'a>(
    key: &'a str,
    inbox_prefix: &str,
    metadata_preset: Option<&'a str>,
    default_preset: Option<&'a str>,
) -> Option<&'a str> {
    let from_metadata = metadata_preset.map(str::trim).filter(|p| !p.is_empty());
    let from_key = key
        .strip_prefix(inbox_prefix)
        .and_then(|rest| rest.split_once('/'))
        .map(|(first, _)| first)
        .filter(|p| !p.is_empty());
    from_metadata.or(from_key).or(default_preset)
}

/// The subject for a prompt: the metadata value, single-line and at most
/// [`MAX_SUBJECT_CHARS`] characters, else the configured default.
pub fn subject(metadata_subject: Option<&str>, default_subject: &str) -> String {
    metadata_subject
        .and_then(clean_subject)
        .unwrap_or_else(|| default_subject.to_owned())
}

/// The pipeline options a preset asks for, under the configured limits.
pub fn prepare_options(preset: &Preset, config: &PreprocessConfig) -> PrepareOptions {
    let mut canny = None;
    for kind in preset.control_kinds() {
        match kind {
            ControlKind::Canny => canny = Some(config.canny()),
            // The worker draws depth and pose maps from the prepared input (its estimators).
            ControlKind::Depth | ControlKind::Pose => {}
        }
    }
    let size = match preset.resolution {
        Resolution::Bucket => None,
        Resolution::Fixed { width, height } => Some(Bucket { width, height }),
    };
    // Portrait presets: the face framed in the preset's fixed size, else the portrait bucket.
    // SeetaFace gives no eye landmarks, so `eyes_level` has nothing to act on (see `frame`).
    let face = preset.face.as_ref().map(|framing| FaceOptions {
        required: framing.required,
        head_ratio: framing.head_ratio,
        bucket: size.unwrap_or(PORTRAIT_BUCKET),
        ..FaceOptions::default()
    });
    PrepareOptions {
        limits: config.limits(),
        canny,
        size,
        face,
        ..PrepareOptions::default()
    }
}

/// Key of the prepared image: `work/<job>/input.png`.
pub fn input_key(job: JobId) -> String {
    format!("work/{job}/input.png")
}

/// Key of a control map: `work/<job>/control-<kind>.png`.
pub fn control_key(job: JobId, kind: ControlKind) -> String {
    format!("work/{job}/control-{}.png", kind.as_str())
}

/// File name of a control map inside the job's folder: `control-<kind>.png`.
pub fn control_file_name(kind: ControlKind) -> String {
    format!("control-{}.png", kind.as_str())
}

/// Where results go: `outputs/<job>/`.
pub fn output_prefix(job: JobId) -> String {
    format!("outputs/{job}/")
}

/// The job's noise seed: derived from the job id, so a redelivered job renders the same
/// picture; 53 bits, so JSON readers that hold numbers as doubles read it exactly.
pub fn seed(job: JobId) -> u64 {
    let bytes = job.derived_id("seed").into_bytes();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(first) & ((1 << 53) - 1)
}

/// The preset's rendering parameters, with `{subject}` replaced.
pub fn render_params(preset: &Preset, subject: &str) -> RenderParams {
    RenderParams {
        prompt: preset.render_prompt(subject),
        negative_prompt: preset.negative_prompt.clone(),
        steps: preset.steps,
        guidance: preset.guidance,
        scheduler: preset.scheduler.clone(),
        strength: preset.strength,
        loras: preset
            .loras
            .iter()
            .map(|lora| LoraParams {
                name: lora.name.clone(),
                weight: lora.weight,
            })
            .collect(),
        controlnets: preset
            .controlnets
            .iter()
            .map(|control| ControlNetParams {
                kind: control.kind.as_str().to_owned(),
                model: control.model.clone(),
                scale: control.scale,
                start: control.start,
                end: control.end,
            })
            .collect(),
        tone: preset.tone.as_ref().map(|tone| ToneParams {
            temperature_k: tone.temperature_k,
            tint: tone.tint,
            strength: tone.strength,
            lut: tone.lut.clone(),
        }),
    }
}

/// One file to store: its name in the job's folder, its key in the bucket, its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Artefact {
    /// `input.png` or `control-<kind>.png`.
    pub file_name: String,
    /// `work/<job>/<file_name>`.
    pub key: String,
    /// A metadata-free PNG.
    pub png: Vec<u8>,
}

/// What a prepared upload becomes: the files to store and the job to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutput {
    /// `input.png` first, then the control maps in the preset's order.
    pub artefacts: Vec<Artefact>,
    /// The job for the GPU worker.
    pub job: InferenceJob,
}

/// Encodes the prepared pixels as PNGs and writes the job that points at them.
///
/// # Errors
/// [`JobError::Preprocess`] (`internal`) if the pipeline did not draw a map the preset needs.
pub fn job_output(
    job_id: JobId,
    source: ObjectRef,
    preset: &Preset,
    subject: &str,
    prepared: &Prepared,
) -> Result<JobOutput, JobError> {
    let mut artefacts = vec![Artefact {
        file_name: "input.png".to_owned(),
        key: input_key(job_id),
        png: encode_png(&prepared.image),
    }];
    let mut control_images = Vec::new();
    for kind in preset.control_kinds() {
        let map = match kind {
            ControlKind::Canny => prepared.canny.as_ref(),
            // Drawn by the worker from `input.png`: no map in the job.
            ControlKind::Depth | ControlKind::Pose => continue,
        }
        .ok_or_else(|| {
            JobError::Preprocess(PreprocessError::Internal {
                message: format!("the pipeline drew no {} map", kind.as_str()),
            })
        })?;
        let key = control_key(job_id, kind);
        control_images.push(ControlImage {
            kind: kind.as_str().to_owned(),
            key: key.clone(),
        });
        artefacts.push(Artefact {
            file_name: control_file_name(kind),
            key,
            png: encode_png(map),
        });
    }
    let (width, height) = prepared.image.dimensions();
    let job = InferenceJob {
        job_id,
        source,
        preset: preset.name.clone(),
        init_image_key: input_key(job_id),
        control_images,
        width,
        height,
        seed: seed(job_id),
        output_prefix: output_prefix(job_id),
        render: render_params(preset, subject),
    };
    Ok(JobOutput { artefacts, job })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use darkroom_shared::preset::PresetLibrary;

    use super::*;

    #[test]
    fn preset_from_metadata_then_key_then_default() {
        let name = |key, meta, default| preset_name(key, "inbox/", meta, default);
        assert_eq!(
            name("inbox/profile-warm/a.jpg", None, None),
            Some("profile-warm")
        );
        assert_eq!(
            name("inbox/desk-setup/2024/june/a.jpg", None, None),
            Some("desk-setup")
        );
        assert_eq!(
            name("inbox/profile-warm/a.jpg", Some(" storybook "), None),
            Some("storybook")
        );
        assert_eq!(
            name("inbox/profile-warm/a.jpg", Some(""), None),
            Some("profile-warm")
        );
        assert_eq!(
            name("inbox/a.jpg", None, Some("desk-setup")),
            Some("desk-setup")
        );
        assert_eq!(
            name("inbox//a.jpg", None, Some("desk-setup")),
            Some("desk-setup")
        );
        assert_eq!(name("inbox/a.jpg", None, None), None);
        // Another prefix is not read as a preset.
        assert_eq!(name("elsewhere/profile-warm/a.jpg", None, None), None);
    }

    #[test]
    fn subjects_are_single_line_and_bounded() {
        assert_eq!(subject(None, "default"), "default");
        assert_eq!(subject(Some("  "), "default"), "default");
        assert_eq!(subject(Some("a\nb\tc"), "default"), "a b c");
        let long = "x".repeat(1000);
        assert_eq!(
            subject(Some(&long), "default").chars().count(),
            MAX_SUBJECT_CHARS
        );
    }

    #[test]
    fn options_follow_the_preset() {
        let library = PresetLibrary::builtin().unwrap();
        let config = PreprocessConfig {
            preprocess_canny_low: 80.0,
            preprocess_max_bytes: 1234,
            ..PreprocessConfig::default()
        };
        let desk = prepare_options(library.get("desk-setup").unwrap(), &config);
        assert_eq!(desk.canny.map(|c| c.low), Some(80.0));
        assert_eq!(desk.limits.max_bytes, 1234);
        assert_eq!(desk.size, None);
        let storybook = prepare_options(library.get("storybook").unwrap(), &config);
        assert_eq!(storybook.canny.map(|c| c.low), Some(80.0));
        let depth = Preset::from_toml(
            "deep",
            "name = \"deep\"\nprompt = \"x\"\n[[controlnets]]\nkind = \"depth\"\nmodel = \"d\"\n",
        )
        .unwrap();
        assert!(prepare_options(&depth, &config).canny.is_none());
        let pose = Preset::from_toml(
            "posed",
            "name = \"posed\"\nprompt = \"x\"\n[[controlnets]]\nkind = \"pose\"\nmodel = \"p\"\n",
        )
        .unwrap();
        assert!(prepare_options(&pose, &config).canny.is_none());

        let fixed = Preset::from_toml(
            "fixed",
            "name = \"fixed\"\nprompt = \"x\"\nresolution = { width = 1024, height = 768 }\n",
        )
        .unwrap();
        let options = prepare_options(&fixed, &config);
        assert_eq!(
            options.size,
            Some(Bucket {
                width: 1024,
                height: 768
            })
        );
        assert_eq!(options.canny, None);
    }

    #[test]
    fn errors_map_to_reasons() {
        let library = PresetLibrary::builtin().unwrap();
        let unknown = JobError::from(library.get("nope").unwrap_err());
        assert_eq!(unknown.reason(), FailureReason::UnknownPreset);
        assert_eq!(JobError::NoPreset.reason(), FailureReason::UnknownPreset);
        let svg = JobError::from(PreprocessError::UnsupportedFormat { detected: "svg" });
        assert_eq!(svg.reason(), FailureReason::UnsupportedFormat);
        let big = JobError::from(PreprocessError::TooManyBytes {
            len: 2,
            max_bytes: 1,
        });
        assert_eq!(big.reason(), FailureReason::LimitExceeded);
    }

    #[test]
    fn seeds_are_stable_per_job_and_json_safe() {
        let a = JobId::for_object("b", "inbox/a.jpg", "e1");
        let b = JobId::for_object("b", "inbox/a.jpg", "e2");
        assert_eq!(seed(a), seed(a));
        assert_ne!(seed(a), seed(b));
        assert!(seed(a) < 1 << 53 && seed(b) < 1 << 53);
    }

    #[test]
    fn portrait_presets_frame_the_face_and_others_do_not() {
        let library = PresetLibrary::builtin().unwrap();
        let config = PreprocessConfig::default();
        let warm = prepare_options(library.get("profile-warm").unwrap(), &config);
        let face = warm.face.expect("profile-warm has a [face] table");
        assert!(face.required);
        assert_eq!(face.head_ratio, 0.4);
        assert_eq!(face.bucket, PORTRAIT_BUCKET);
        let desk = prepare_options(library.get("desk-setup").unwrap(), &config);
        assert!(desk.face.is_none());
    }

    #[test]
    fn the_job_points_at_its_files_and_carries_the_preset() {
        let library = PresetLibrary::builtin().unwrap();
        let preset = library.get("profile-warm").unwrap();
        let image = image::RgbImage::from_fn(96, 64, |x, y| {
            image::Rgb([(x * 2) as u8, (y * 3) as u8, if x > 48 { 255 } else { 0 }])
        });
        let mut png = std::io::Cursor::new(Vec::new());
        image.write_to(&mut png, image::ImageFormat::Png).unwrap();
        let mut options = prepare_options(preset, &PreprocessConfig::default());
        // The synthetic picture has no face: framing is tested on photos in tests/face.rs.
        options.face = None;
        let prepared = crate::prepare(png.get_ref(), &options).unwrap();
        let job_id = JobId::for_object("photos", "inbox/profile-warm/me.png", "abc");
        let source = ObjectRef::new("photos", "inbox/profile-warm/me.png");
        let out = job_output(job_id, source.clone(), preset, "Ada", &prepared).unwrap();

        let names: Vec<_> = out.artefacts.iter().map(|a| a.file_name.as_str()).collect();
        assert_eq!(names, ["input.png", "control-canny.png"]);
        assert_eq!(out.artefacts[0].key, format!("work/{job_id}/input.png"));
        assert_eq!(out.job.init_image_key, out.artefacts[0].key);
        assert_eq!(out.job.control_images[0].key, out.artefacts[1].key);
        assert_eq!(out.job.control_images[0].kind, "canny");
        assert_eq!(
            (out.job.width, out.job.height),
            (prepared.bucket.width, prepared.bucket.height)
        );
        assert_eq!(out.job.source, source);
        assert_eq!(out.job.output_prefix, format!("outputs/{job_id}/"));
        assert!(out.job.render.prompt.contains("headshot of Ada"));
        assert_eq!(out.job.render.strength, Some(0.55));
        assert_eq!(
            out.job.render.controlnets[0].model,
            "controlnet-canny-sdxl-1.0"
        );
        assert_eq!(
            out.job.render.tone.as_ref().map(|t| t.temperature_k),
            Some(5200.0)
        );
        for artefact in &out.artefacts {
            let decoded = image::load_from_memory(&artefact.png).unwrap();
            assert_eq!(decoded.width(), out.job.width);
        }
    }
}
