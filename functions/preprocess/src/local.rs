//! Local mode: the same pipeline on a file, writing what the function would upload and
//! publish, for people trying presets and for checks without servers.
//!
//! `darkroom-preprocess local --input photo.jpg --preset profile-warm --out DIR` writes
//! `DIR/input.png`, `DIR/control-<kind>.png` and `DIR/job.json` (the
//! [`InferenceJob`] it would publish). The job's source is the object the file would be as
//! a single-part upload to `<bucket>/<inbox prefix><preset>/<file name>`, its ETag the
//! file's MD5 as S3 computes it, so the job id is the one the real upload would get.

use std::io::Read;
use std::path::{Path, PathBuf};

use darkroom_events::{FailureReason, InferenceJob, JobId, ObjectRef};
use md5::{Digest, Md5};
use serde::Serialize;

use crate::PreprocessError;
use crate::config::PreprocessConfig;
use crate::job::{self, JobError};

/// Why a local run failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The upload (or the preset) was refused, as the function would refuse it.
    #[error(transparent)]
    Rejected(#[from] JobError),
    /// A file could not be read or written.
    #[error("{}: {message}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        message: String,
    },
}

impl LocalError {
    /// The reason code the function would report (`internal` for local I/O).
    pub fn reason(&self) -> FailureReason {
        match self {
            LocalError::Rejected(error) => error.reason(),
            LocalError::Io { .. } => FailureReason::Internal,
        }
    }

    /// The error as JSON: `{"reason": …, "message": …}`.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Report<'a> {
            reason: FailureReason,
            message: &'a str,
        }
        let message = self.to_string();
        serde_json::to_string(&Report {
            reason: self.reason(),
            message: &message,
        })
        .unwrap_or_else(|_| String::from("{\"reason\":\"internal\"}"))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LocalError + '_ {
    move |error| LocalError::Io {
        path: path.to_owned(),
        message: error.to_string(),
    }
}

/// Runs the pipeline on `input` with the preset `preset_name` and writes the results to
/// `out` (created if missing). Returns the job written to `job.json`.
///
/// # Errors
/// [`LocalError::Rejected`] when the function would refuse the upload (with the same reason),
/// [`LocalError::Io`] for files that cannot be read or written.
pub fn run(
    config: &PreprocessConfig,
    input: &Path,
    preset_name: &str,
    subject: Option<&str>,
    out: &Path,
) -> Result<InferenceJob, LocalError> {
    let presets = config.presets().map_err(JobError::from)?;
    let preset = presets.get(preset_name).map_err(JobError::from)?;
    let options = job::prepare_options(preset, config);

    let max_bytes = config.preprocess_max_bytes;
    let mut file = std::fs::File::open(input).map_err(io(input))?;
    let len = file.metadata().map_err(io(input))?.len();
    if len > max_bytes as u64 {
        return Err(JobError::from(PreprocessError::TooManyBytes {
            len: usize::try_from(len).unwrap_or(usize::MAX),
            max_bytes,
        })
        .into());
    }
    let mut bytes = Vec::new();
    // One byte past the limit is enough to tell a file that grew since the size check.
    file.by_ref()
        .take(max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io(input))?;

    let file_name = input
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "upload".to_owned());
    let etag = hex(&Md5::digest(&bytes));
    let source = ObjectRef {
        bucket: config.runtime.bucket.clone(),
        key: format!(
            "{}{preset_name}/{file_name}",
            config.preprocess_inbox_prefix
        ),
        etag: Some(etag.clone()),
        version_id: None,
        size: Some(bytes.len() as u64),
    };
    let job_id = JobId::for_object(&source.bucket, &source.key, &etag);
    let subject = job::subject(subject, &config.preprocess_default_subject);

    let prepared = crate::prepare(&bytes, &options).map_err(JobError::from)?;
    let output = job::job_output(job_id, source, preset, &subject, &prepared)?;

    std::fs::create_dir_all(out).map_err(io(out))?;
    for artefact in &output.artefacts {
        let path = out.join(&artefact.file_name);
        std::fs::write(&path, &artefact.png).map_err(io(&path))?;
    }
    let path = out.join("job.json");
    let json = serde_json::to_vec_pretty(&output.job).map_err(|e| LocalError::Io {
        path: path.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&path, json).map_err(io(&path))?;
    Ok(output.job)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn md5_is_what_s3_uses_as_a_single_part_etag() {
        // RFC 1321 test vector.
        assert_eq!(
            hex(&Md5::digest(b"abc")),
            "900150983cd24fb0d6963f7d28e17f72"
        );
    }

    #[test]
    fn errors_serialise_with_their_reason() {
        let error = LocalError::from(JobError::from(PreprocessError::UnsupportedFormat {
            detected: "svg",
        }));
        let json: serde_json::Value = serde_json::from_str(&error.to_json()).unwrap();
        assert_eq!(json["reason"], "unsupported_format");
        assert!(json["message"].as_str().unwrap().contains("svg"));
    }

    #[test]
    fn an_oversized_file_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("big.jpg");
        std::fs::write(&input, vec![0u8; 2048]).unwrap();
        let config = PreprocessConfig {
            preprocess_max_bytes: 1024,
            ..PreprocessConfig::default()
        };
        let error = run(&config, &input, "desk-setup", None, &dir.path().join("out")).unwrap_err();
        assert_eq!(error.reason(), FailureReason::LimitExceeded);
        assert!(!dir.path().join("out").exists());
    }
}
