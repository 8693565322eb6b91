//! The engine thread: the SDXL pipeline, its LoRA and ControlNet caches, and one render at a
//! time, on a thread of its own.
//!
//! Rendering is seconds of blocking libtorch calls. It runs here, off the async runtime's
//! worker threads, so in-progress acks, progress events and cancel messages keep flowing
//! while a job renders. The handler talks to the thread through [`Engine::render`]: a task in,
//! a [`Rendered`] picture (or a [`RenderError`]) out, with step progress on a watch channel and
//! a cancel flag checked between steps.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use darkroom_events::{AdapterUsed, InferenceJob, ModelUsed, StageTimings};
use darkroom_inference::EngineError;
use darkroom_inference::depth::DepthEstimator;
use darkroom_inference::device::{DType, DeviceSpec};
use darkroom_inference::kernels::KernelChoice;
use darkroom_inference::loader::{
    Component, ComponentSource, ModelSource, SourceOptions, WeightVariant,
};
use darkroom_inference::lora::{LoraCache, LoraSpec, LoraTarget};
use darkroom_inference::pipeline::{
    ControlInput, ControlNetId, GenerateRequest, InitImage, LoadOptions, SdxlPipeline,
};
use darkroom_inference::pose::PoseEstimator;
use darkroom_tone::{CubeLimits, CubeLut, ToneGrade, ToneSettings};
use image::RgbImage;
use tokio::sync::{oneshot, watch};

use crate::assets::{AssetDirs, AssetKind};
use crate::config::WorkerConfig;
use crate::digest::{self, DigestCache};
use crate::error::RenderError;
use crate::watchdog::Watchdog;
use darkroom_shared::png::encode_png;

/// A job with its prepared images, ready for the engine.
#[derive(Debug)]
pub struct RenderTask {
    /// The job.
    pub job: InferenceJob,
    /// The prepared input (`work/<job>/input.png`), at the job's size.
    pub init: RgbImage,
    /// Control maps by kind (`canny` → `work/<job>/control-canny.png`).
    pub controls: HashMap<String, RgbImage>,
}

/// A finished picture and how it was made.
#[derive(Debug)]
pub struct Rendered {
    /// The picture as PNG, no metadata chunks.
    pub png: Vec<u8>,
    /// The LoRAs fused for it, with their digests.
    pub loras: Vec<AdapterUsed>,
    /// The ControlNets that steered it, with their digests.
    pub controlnets: Vec<AdapterUsed>,
    /// The engine's stages (`adapters_ms` … `finish_ms`; the handler fills in the rest).
    pub timings: StageTimings,
}

/// The control kinds whose maps the engine draws from the prepared input when a job brings
/// none (with its depth and pose estimators).
pub const DRAWN_CONTROL_KINDS: [&str; 2] = ["depth", "pose"];

/// Steps done and steps in all, as the engine reports them.
pub type Progress = Option<(u32, u32)>;

/// How the model was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedModel {
    /// Its name: the folder or file name.
    pub name: String,
    /// Where it runs (`cpu`, `cuda:0`).
    pub device: String,
    /// In which precision.
    pub dtype: String,
    /// Seconds the load took.
    pub load_seconds: u64,
    /// The depth estimator's folder name, when one is loaded.
    pub depth_model: Option<String>,
    /// The pose estimator's file name, when one is loaded.
    pub pose_model: Option<String>,
}

struct Job {
    task: RenderTask,
    cancel: Arc<AtomicBool>,
    progress: watch::Sender<Progress>,
    reply: oneshot::Sender<Result<Rendered, RenderError>>,
}

/// The engine thread's handle. Dropping it lets the thread finish its job and exit.
pub struct Engine {
    jobs: mpsc::SyncSender<Job>,
    model: LoadedModel,
    digest: watch::Receiver<Option<Result<String, String>>>,
    watchdog: Watchdog,
}

impl Engine {
    /// Starts the engine thread and loads the model on it; returns once the model is loaded
    /// (seconds to minutes: call it from a blocking context).
    ///
    /// # Errors
    /// No model configured, a device or precision the machine cannot run, or a model that
    /// does not load (the error names the file and tensor).
    pub fn start(config: &WorkerConfig) -> Result<Engine, EngineError> {
        let model_path = config
            .model
            .clone()
            .ok_or_else(|| EngineError::InvalidConfig {
                component: "worker",
                message: "no model configured: set DARKROOM_MODEL to an SDXL diffusers folder or \
                      single-file checkpoint"
                    .to_owned(),
            })?;
        let (device, dtype) = device_and_dtype(&config.device, &config.dtype)?;
        let (device, kind) = darkroom_inference::device::resolve(device, dtype)?;
        // Before seconds of loading: the fused kernels are CUDA's.
        let kernels = config.kernels;
        if kernels != KernelChoice::Stock && !device.is_cuda() {
            return Err(EngineError::InvalidConfig {
                component: "worker",
                message: format!(
                    "DARKROOM_KERNELS={kernels} needs a CUDA device; this worker runs on the CPU \
                     (DARKROOM_DEVICE={})",
                    config.device
                ),
            });
        }
        let name = model_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| model_path.display().to_string());

        // The digest of gigabytes of weights takes seconds: computed beside the load, awaited
        // only by the first `completed` event.
        let (digest_tx, digest_rx) = watch::channel(None);
        let options = SourceOptions::new(dtype);
        let options = match &config.model_config_dir {
            Some(dir) => options.with_config_dir(dir),
            None => options,
        };
        let weights = ModelSource::open(&model_path, &options)?;
        let files: Vec<PathBuf> = Component::ALL
            .iter()
            .filter_map(|c| weights.component(*c))
            .flat_map(|source| source.files.iter().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let root = model_path.clone();
        std::thread::Builder::new()
            .name("model-digest".to_owned())
            .spawn(move || {
                let digest = digest::files_sha256(&root, &files).map_err(|e| e.to_string());
                digest_tx.send_replace(Some(digest));
            })
            .map_err(|e| EngineError::Io {
                path: model_path.clone(),
                source: e,
            })?;

        let (jobs, queue) = mpsc::sync_channel::<Job>(1);
        let (loaded_tx, loaded_rx) = mpsc::channel();
        let load_options = LoadOptions {
            config_dir: config.model_config_dir.clone(),
            ..LoadOptions::default()
        };
        let assets = AssetDirs::from_config(config);
        let lora_cache_bytes = config.lora_cache_mib << 20;
        let controlnet_cache = config.controlnet_cache.max(1);
        let cuda_graphs = config.cuda_graphs;
        let depth_path = config.depth_model.clone();
        let depth_model = depth_path.as_deref().map(file_label);
        let pose_path = config.pose_model.clone();
        let pose_model = pose_path.as_deref().map(file_label);
        let path = model_path.clone();
        let watchdog = Watchdog::default();
        let engine_watchdog = watchdog.clone();
        std::thread::Builder::new()
            .name("engine".to_owned())
            .spawn(move || {
                let started = Instant::now();
                let loaded = SdxlPipeline::load_with(&path, device, dtype, &load_options).and_then(
                    |pipeline| {
                        let target = pipeline.lora_target()?;
                        Ok((pipeline, target))
                    },
                );
                let loaded = loaded.and_then(|(pipeline, target)| {
                    let depth = depth_path
                        .as_deref()
                        .map(|dir| DepthEstimator::load(dir, device, dtype))
                        .transpose()?;
                    let pose = pose_path
                        .as_deref()
                        .map(|path| PoseEstimator::load(path, device, dtype))
                        .transpose()?;
                    Ok((pipeline, target, depth, pose))
                });
                let (mut pipeline, lora_target, depth, pose) = match loaded {
                    Ok(loaded) => loaded,
                    Err(error) => {
                        let _ = loaded_tx.send(Err(error));
                        return;
                    }
                };
                #[cfg(feature = "cuda")]
                pipeline.set_cuda_graphs(cuda_graphs);
                #[cfg(not(feature = "cuda"))]
                let _ = cuda_graphs;
                if let Err(error) = pipeline.use_kernels(kernels) {
                    let _ = loaded_tx.send(Err(error));
                    return;
                }
                let _ = loaded_tx.send(Ok(started.elapsed()));
                let mut state = EngineState {
                    pipeline,
                    lora_target,
                    loras: LoraCache::new(lora_cache_bytes),
                    controlnets: HashMap::new(),
                    controlnet_cache,
                    depth,
                    pose,
                    digests: DigestCache::default(),
                    assets,
                    dtype,
                    clock: 0,
                    watchdog: engine_watchdog,
                };
                while let Ok(job) = queue.recv() {
                    let watchdog = state.watchdog.clone();
                    let _rendering = watchdog.rendering();
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        state.render(job.task, &job.cancel, &job.progress)
                    }))
                    .unwrap_or_else(|panic| {
                        let message = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                            .unwrap_or_else(|| "unknown panic".to_owned());
                        Err(RenderError::Panicked(message))
                    });
                    let _ = job.reply.send(outcome);
                }
            })
            .map_err(|e| EngineError::Io {
                path: model_path.clone(),
                source: e,
            })?;
        let elapsed = match loaded_rx.recv() {
            Ok(Ok(elapsed)) => elapsed,
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                return Err(EngineError::InvalidConfig {
                    component: "worker",
                    message: "the engine thread died while loading the model".to_owned(),
                });
            }
        };
        Ok(Engine {
            jobs,
            model: LoadedModel {
                name,
                device: format!("{device:?}").to_lowercase(),
                dtype: format!("{kind:?}").to_lowercase(),
                load_seconds: elapsed.as_secs(),
                depth_model,
                pose_model,
            },
            digest: digest_rx,
            watchdog,
        })
    }

    /// The engine's progress, beaten at every phase and step of a render.
    pub fn watchdog(&self) -> &Watchdog {
        &self.watchdog
    }

    /// How the model was loaded.
    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// The base model's name and digest, once the digest is computed.
    ///
    /// # Errors
    /// The weights could not be read for hashing.
    pub async fn model_used(&self) -> Result<ModelUsed, RenderError> {
        let mut digest = self.digest.clone();
        let value = digest
            .wait_for(Option::is_some)
            .await
            .map_err(|_| RenderError::EngineGone)?;
        match value.as_ref() {
            Some(Ok(sha256)) => Ok(ModelUsed {
                name: self.model.name.clone(),
                sha256: sha256.clone(),
            }),
            Some(Err(message)) => Err(RenderError::Digest(message.clone())),
            None => Err(RenderError::EngineGone),
        }
    }

    /// Renders `task` on the engine thread. `cancel` is read between steps; each finished step
    /// is sent on `progress`.
    ///
    /// # Errors
    /// See [`RenderError`].
    pub async fn render(
        &self,
        task: RenderTask,
        cancel: Arc<AtomicBool>,
        progress: watch::Sender<Progress>,
    ) -> Result<Rendered, RenderError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            task,
            cancel,
            progress,
            reply,
        };
        // The channel holds one job and the handler sends one at a time: this never blocks
        // for long, but it is a blocking call, so not on the runtime's threads.
        let jobs = self.jobs.clone();
        tokio::task::spawn_blocking(move || jobs.send(job).is_ok())
            .await
            .ok()
            .filter(|sent| *sent)
            .ok_or(RenderError::EngineGone)?;
        answer.await.map_err(|_| RenderError::EngineGone)?
    }
}

/// `auto` resolved: the first GPU when there is one, in f16; else the CPU in f32.
fn device_and_dtype(device: &str, dtype: &str) -> Result<(DeviceSpec, DType), EngineError> {
    let device = match device.trim() {
        "auto" | "" => {
            if darkroom_inference::device::cuda_device_count() > 0 {
                DeviceSpec::Cuda(0)
            } else {
                DeviceSpec::Cpu
            }
        }
        other => other.parse()?,
    };
    let dtype = match dtype.trim() {
        "auto" | "" => device.default_dtype(),
        other => other.parse()?,
    };
    Ok((device, dtype))
}

/// A model path as the inventory names it: its file or folder name.
fn file_label(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// A ControlNet kept loaded.
struct CachedControlNet {
    id: ControlNetId,
    sha256: String,
    last_used: u64,
}

/// What lives on the engine thread.
struct EngineState {
    pipeline: SdxlPipeline,
    lora_target: LoraTarget,
    loras: LoraCache,
    controlnets: HashMap<String, CachedControlNet>,
    controlnet_cache: usize,
    depth: Option<DepthEstimator>,
    pose: Option<PoseEstimator>,
    digests: DigestCache,
    assets: AssetDirs,
    dtype: DType,
    clock: u64,
    watchdog: Watchdog,
}

impl EngineState {
    fn render(
        &mut self,
        task: RenderTask,
        cancel: &AtomicBool,
        progress: &watch::Sender<Progress>,
    ) -> Result<Rendered, RenderError> {
        let RenderTask {
            job,
            init,
            mut controls,
        } = task;
        let render = &job.render;
        let mut timings = StageTimings::default();

        let started = Instant::now();
        for kind in DRAWN_CONTROL_KINDS {
            if render.controlnets.iter().any(|c| c.kind == kind) && !controls.contains_key(kind) {
                controls.insert(kind.to_owned(), self.control_map(kind, &init)?);
                self.watchdog.beat();
            }
        }
        let loras = self.switch_loras(&job)?;
        self.watchdog.beat();
        let mut control_inputs = Vec::with_capacity(render.controlnets.len());
        let mut controlnets = Vec::with_capacity(render.controlnets.len());
        let names: Vec<&str> = render
            .controlnets
            .iter()
            .map(|c| c.model.as_str())
            .collect();
        for params in &render.controlnets {
            let (id, sha256) = self.controlnet(&params.model, &names)?;
            self.watchdog.beat();
            let image = controls.remove(&params.kind).ok_or_else(|| {
                RenderError::InvalidJob(format!(
                    "ControlNet {} reads a {} control image the job does not have",
                    params.model, params.kind
                ))
            })?;
            control_inputs.push(ControlInput {
                conditioning_scale: params.scale,
                guidance_start: params.start,
                guidance_end: params.end,
                ..ControlInput::new(id, image)
            });
            controlnets.push(AdapterUsed {
                name: params.model.clone(),
                sha256,
                weight: params.scale,
            });
        }
        timings.adapters_ms = millis(started.elapsed());

        let request = GenerateRequest {
            prompt: render.prompt.clone(),
            // An empty negative prompt means SDXL's zeroed unconditional embedding.
            negative_prompt: (!render.negative_prompt.is_empty())
                .then(|| render.negative_prompt.clone()),
            width: job.width,
            height: job.height,
            steps: render.steps as usize,
            guidance: render.guidance,
            seed: i64::try_from(job.seed)
                .map_err(|_| RenderError::InvalidJob(format!("seed {} is over 2^63", job.seed)))?,
            scheduler: render
                .scheduler
                .parse()
                .map_err(|e: EngineError| RenderError::InvalidJob(e.to_string()))?,
            init: render.strength.map(|strength| InitImage {
                image: init,
                strength,
            }),
            controls: control_inputs,
        };
        let watchdog = &self.watchdog;
        let generated = self
            .pipeline
            .generate_until(&request, &mut |done, total| {
                watchdog.beat();
                #[cfg(feature = "fault-hooks")]
                crate::fault::at_step(done);
                progress.send_replace(Some((
                    u32::try_from(done).unwrap_or(u32::MAX),
                    u32::try_from(total).unwrap_or(u32::MAX),
                )));
                if cancel.load(Ordering::Relaxed) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .map_err(|error| match error {
                EngineError::Stopped { step, steps } => RenderError::Cancelled { step, steps },
                other => RenderError::Engine(other),
            })?;
        self.watchdog.beat();
        timings.text_ms = millis(generated.timings.text);
        timings.prepare_ms = millis(generated.timings.prepare);
        timings.denoise_ms = millis(generated.timings.denoise);
        timings.decode_ms = millis(generated.timings.decode);

        let started = Instant::now();
        let mut image = generated.image;
        if let Some(tone) = &render.tone {
            let lut = match &tone.lut {
                Some(name) => {
                    let path = self.assets.resolve(AssetKind::Lut, name)?;
                    Some(CubeLut::from_file(&path, &CubeLimits::default())?)
                }
                None => None,
            };
            let settings = ToneSettings {
                temperature_k: tone.temperature_k,
                tint: tone.tint,
                strength: tone.strength,
            };
            ToneGrade::new(&settings, lut.as_ref())?.apply(&mut image);
        }
        let png = encode_png(&image);
        timings.finish_ms = millis(started.elapsed());
        Ok(Rendered {
            png,
            loras,
            controlnets,
            timings,
        })
    }

    /// The `depth` or `pose` map of the prepared input, as the RGB control image those
    /// ControlNets take, drawn with this worker's estimator.
    fn control_map(&self, kind: &'static str, init: &RgbImage) -> Result<RgbImage, RenderError> {
        let missing = |setting| RenderError::NoEstimator { kind, setting };
        let map = if kind == "depth" {
            let estimator = self.depth.as_ref().ok_or(missing("DARKROOM_DEPTH_MODEL"))?;
            let map = estimator.depth_map(init).map_err(RenderError::Engine)?;
            image::DynamicImage::ImageLuma8(map).to_rgb8()
        } else {
            let estimator = self.pose.as_ref().ok_or(missing("DARKROOM_POSE_MODEL"))?;
            estimator.pose_map(init).map_err(RenderError::Engine)?
        };
        Ok(map)
    }

    /// Fuses the job's LoRAs (from the cache; restoring the base model when it names none).
    fn switch_loras(&mut self, job: &InferenceJob) -> Result<Vec<AdapterUsed>, RenderError> {
        let mut specs = Vec::with_capacity(job.render.loras.len());
        let mut used = Vec::with_capacity(job.render.loras.len());
        for lora in &job.render.loras {
            let path = self.assets.resolve(AssetKind::Lora, &lora.name)?;
            used.push(AdapterUsed {
                name: lora.name.clone(),
                sha256: self
                    .digests
                    .get(&path, std::slice::from_ref(&path))
                    .map_err(|e| RenderError::Io {
                        path: path.clone(),
                        source: e,
                    })?,
                weight: lora.weight,
            });
            specs.push(LoraSpec {
                path,
                weight: lora.weight,
            });
        }
        let loras = self
            .loras
            .get_many(&specs, &self.lora_target)
            .map_err(|e| RenderError::Engine(e.into()))?;
        self.pipeline
            .set_loras(&loras)
            .map_err(RenderError::Engine)?;
        Ok(used)
    }

    /// The ControlNet `name`, loaded if need be (unloading the least recently used one not in
    /// `keep` when the cache is full), with its digest.
    fn controlnet(
        &mut self,
        name: &str,
        keep: &[&str],
    ) -> Result<(ControlNetId, String), RenderError> {
        self.clock += 1;
        let dir = self.assets.resolve(AssetKind::ControlNet, name)?;
        if let Some(cached) = self.controlnets.get_mut(name) {
            cached.last_used = self.clock;
            return Ok((cached.id, cached.sha256.clone()));
        }
        while self.controlnets.len() >= self.controlnet_cache {
            let oldest = self
                .controlnets
                .iter()
                .filter(|(cached, _)| !keep.contains(&cached.as_str()))
                .min_by_key(|(_, net)| net.last_used)
                .map(|(name, _)| name.clone());
            let Some(oldest) = oldest else { break };
            if let Some(evicted) = self.controlnets.remove(&oldest) {
                tracing::info!(controlnet = %oldest, "unloading the least recently used ControlNet");
                self.pipeline.remove_controlnet(evicted.id);
            }
        }
        let started = Instant::now();
        let sha256 = self.controlnet_digest(&dir)?;
        let id = self
            .pipeline
            .load_controlnet(&dir)
            .map_err(RenderError::Engine)?;
        tracing::info!(controlnet = %name, seconds = started.elapsed().as_secs_f64(), "ControlNet loaded");
        self.controlnets.insert(
            name.to_owned(),
            CachedControlNet {
                id,
                sha256: sha256.clone(),
                last_used: self.clock,
            },
        );
        Ok((id, sha256))
    }

    fn controlnet_digest(&mut self, dir: &Path) -> Result<String, RenderError> {
        let source = ComponentSource::model_folder(
            dir,
            Component::ControlNet,
            WeightVariant::for_dtype(self.dtype),
        )
        .map_err(|e| RenderError::Engine(e.into()))?;
        self.digests
            .get(dir, &source.files)
            .map_err(|e| RenderError::Io {
                path: dir.to_owned(),
                source: e,
            })
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_the_cpu_in_f32_without_a_gpu() {
        if darkroom_inference::device::cuda_device_count() == 0 {
            assert_eq!(
                device_and_dtype("auto", "auto").unwrap(),
                (DeviceSpec::Cpu, DType::F32)
            );
        }
        assert_eq!(
            device_and_dtype("cuda:1", "auto").unwrap(),
            (DeviceSpec::Cuda(1), DType::F16)
        );
        assert_eq!(
            device_and_dtype("cpu", "bf16").unwrap(),
            (DeviceSpec::Cpu, DType::Bf16)
        );
        assert!(device_and_dtype("tpu", "auto").is_err());
        assert!(device_and_dtype("cpu", "f8").is_err());
    }

    /// Refused before any loading (the model path does not even exist).
    #[test]
    fn fused_kernels_on_the_cpu_are_refused_at_start() {
        let config = WorkerConfig {
            model: Some(PathBuf::from("/nonexistent/sdxl")),
            device: "cpu".to_owned(),
            kernels: KernelChoice::Fused,
            ..WorkerConfig::default()
        };
        match Engine::start(&config) {
            Err(EngineError::InvalidConfig { message, .. }) => {
                assert!(
                    message.contains("DARKROOM_KERNELS=fused needs a CUDA device"),
                    "{message}"
                );
            }
            Err(other) => panic!("unexpected error: {other}"),
            Ok(_) => panic!("started"),
        }
    }
}
