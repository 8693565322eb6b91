//! Why a job could not be rendered, and what that means for its message: a permanent failure
//! (the job or the worker's files are wrong: retrying renders the same failure) or a transient
//! one (the GPU ran out of memory, S3 hiccupped: another delivery may succeed).

use std::path::PathBuf;

use darkroom_events::FailureReason;
use darkroom_inference::EngineError;
use darkroom_shared::HandlerError;
use darkroom_shared::fetch::FetchError;
use darkroom_tone::ToneError;

use crate::assets::AssetError;

/// A job that could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The job message is not a valid inference job, or is inconsistent (sizes, steps, a
    /// control image missing).
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// The job names a LoRA, ControlNet or LUT this worker does not have, or a name that is not
    /// a plain file name.
    #[error(transparent)]
    Asset(#[from] AssetError),
    /// A prepared input could not be read from S3.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// A prepared input is not a PNG the worker can decode.
    #[error("{key}: {message}")]
    Decode {
        /// The object key.
        key: String,
        /// What the decoder said.
        message: String,
    },
    /// A cancel message stopped the job between two steps.
    #[error("cancelled after step {step} of {steps}")]
    Cancelled {
        /// Steps done.
        step: usize,
        /// Steps the render would have taken.
        steps: usize,
    },
    /// The engine failed: an invalid LoRA or ControlNet file, a request it refuses, libtorch.
    #[error(transparent)]
    Engine(EngineError),
    /// Tone grading refused its settings or LUT.
    #[error("tone: {0}")]
    Tone(#[from] ToneError),
    /// A file could not be read while hashing it.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The model's weights could not be hashed.
    #[error("cannot hash the model's weights: {0}")]
    Digest(String),
    /// A depth or pose ControlNet's map is drawn here, and this worker has no estimator for it.
    #[error(
        "the job's {kind} ControlNet needs a {kind} map and this worker has no {kind} model ({setting})"
    )]
    NoEstimator {
        /// The control kind (`depth`, `pose`).
        kind: &'static str,
        /// The worker setting that provides the estimator.
        setting: &'static str,
    },
    /// The engine panicked on this job.
    #[error("the engine failed unexpectedly: {0}")]
    Panicked(String),
    /// The engine thread is gone.
    #[error("the engine thread is gone")]
    EngineGone,
    /// S3 refused to store the result.
    #[error("cannot store {key}: {message}")]
    Store {
        /// The object key.
        key: String,
        /// What S3 said.
        message: String,
    },
    /// NATS or the jobs KV bucket failed.
    #[error(transparent)]
    Runtime(#[from] darkroom_shared::RuntimeError),
}

impl RenderError {
    /// The reason a `failed` event gives.
    pub fn reason(&self) -> FailureReason {
        match self {
            RenderError::InvalidJob(_) => FailureReason::InvalidEvent,
            RenderError::Asset(_) => FailureReason::ModelError,
            RenderError::Fetch(error) => error.reason(),
            RenderError::Decode { .. } => FailureReason::DecodeFailed,
            RenderError::Cancelled { .. } => FailureReason::Cancelled,
            RenderError::Engine(error) => engine_reason(error),
            RenderError::Tone(error) if error.is_retryable() => FailureReason::Internal,
            RenderError::Tone(_) => FailureReason::ModelError,
            RenderError::Io { .. } | RenderError::Digest(_) | RenderError::NoEstimator { .. } => {
                FailureReason::ModelError
            }
            RenderError::Panicked(_)
            | RenderError::EngineGone
            | RenderError::Store { .. }
            | RenderError::Runtime(_) => FailureReason::Internal,
        }
    }

    /// Whether another delivery could succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            RenderError::Fetch(error) => !error.is_permanent(),
            RenderError::Engine(error) => engine_transient(error),
            RenderError::Tone(error) => error.is_retryable(),
            RenderError::Io { .. }
            | RenderError::Digest(_)
            | RenderError::EngineGone
            | RenderError::Store { .. }
            | RenderError::Runtime(_) => true,
            RenderError::InvalidJob(_)
            | RenderError::NoEstimator { .. }
            | RenderError::Asset(_)
            | RenderError::Decode { .. }
            | RenderError::Cancelled { .. }
            | RenderError::Panicked(_) => false,
        }
    }

    /// The handler error the consumer loop settles the message by.
    pub fn into_handler_error(self) -> HandlerError {
        let reason = self.reason();
        if self.is_transient() {
            HandlerError::transient(reason, self.to_string())
        } else {
            HandlerError::permanent(reason, self.to_string())
        }
    }
}

/// Model, LoRA and ControlNet files that do not load are the worker's problem, reported as
/// `model_error`; a request the engine refuses is the job's.
fn engine_reason(error: &EngineError) -> FailureReason {
    match error {
        EngineError::Model(_) | EngineError::Lora(_) | EngineError::InvalidConfig { .. } => {
            FailureReason::ModelError
        }
        EngineError::InvalidInput { .. }
        | EngineError::InvalidSchedule(_)
        | EngineError::UnknownScheduler(_)
        | EngineError::Tokenizer(_) => FailureReason::InvalidEvent,
        EngineError::Stopped { .. } => FailureReason::Cancelled,
        _ => FailureReason::Internal,
    }
}

/// libtorch and CUDA failures (out of memory above all) and unreadable files may pass; the
/// rest would fail the same way again.
fn engine_transient(error: &EngineError) -> bool {
    matches!(
        error,
        EngineError::Torch(_) | EngineError::Cuda { .. } | EngineError::Io { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assets::AssetKind;

    #[test]
    fn missing_files_fail_for_good_as_model_errors() {
        let error = RenderError::from(AssetError::Missing {
            kind: AssetKind::Lora,
            name: "style.safetensors".to_owned(),
            dir: PathBuf::from("/models/loras"),
        });
        let handler = error.into_handler_error();
        assert!(handler.is_permanent());
        assert_eq!(handler.reason, FailureReason::ModelError);
        assert!(handler.message.contains("style.safetensors"));
    }

    #[test]
    fn cancelling_is_final_and_out_of_memory_is_not() {
        let cancelled = RenderError::Cancelled { step: 3, steps: 30 }.into_handler_error();
        assert!(cancelled.is_permanent());
        assert_eq!(cancelled.reason, FailureReason::Cancelled);
        let oom = RenderError::Engine(EngineError::Torch(tch::TchError::Torch(
            "CUDA out of memory".to_owned(),
        )));
        assert!(oom.is_transient());
    }
}
