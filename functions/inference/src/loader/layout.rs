//! Finding out what a model path holds: a diffusers folder or a single-file checkpoint.
//!
//! The diffusers layout follows `DiffusionPipeline.save_pretrained`: `model_index.json`, one
//! subfolder per component with its `config.json` and weights named
//! `diffusion_pytorch_model[.fp16].safetensors` (diffusers models) or `model[.fp16].safetensors`
//! (transformers models), or shards listed in `<name>.safetensors.index[.fp16].json`.

use std::path::{Component as PathPart, Path, PathBuf};

use serde_json::Value;

use super::key_map::KeyMap;
use super::safetensors::MappedFile;
use super::single_file::SDXL_MARKERS;
use super::{Component, ModelError};
use crate::device::DType;

/// Which of the weights files a diffusers folder may hold for a component to prefer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightVariant {
    /// The full-precision files (`*.safetensors`), falling back to `*.fp16.safetensors`.
    #[default]
    Full,
    /// The half-precision files (`*.fp16.safetensors`), falling back to the full ones.
    Fp16,
}

impl WeightVariant {
    /// What a model run in `dtype` wants: f16 reads the fp16 files (half the bytes, no
    /// conversion); f32 and bf16 read the full-precision ones (bf16 rounded once from f32 is
    /// closer than f16 rounded again, and f16 cannot hold the range bf16 can).
    pub fn for_dtype(dtype: DType) -> Self {
        match dtype {
            DType::F16 => WeightVariant::Fp16,
            DType::F32 | DType::Bf16 => WeightVariant::Full,
        }
    }
}

/// How a model is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A diffusers folder with `model_index.json`.
    Diffusers,
    /// One safetensors checkpoint in the original Stability naming.
    SingleFile,
}

/// Options for [`ModelSource::open`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceOptions {
    /// Which weights files of a diffusers folder to prefer.
    pub variant: WeightVariant,
    /// For a single-file checkpoint: a diffusers folder whose `<component>/config.json`,
    /// tokenizers and scheduler config describe it (its weights are not read). Without it the
    /// components are taken to be SDXL base's. Ignored for diffusers folders, which carry their
    /// own configs.
    pub config_dir: Option<PathBuf>,
}

impl SourceOptions {
    /// The options for a model run in `dtype`, without a config folder.
    pub fn new(dtype: DType) -> Self {
        SourceOptions {
            variant: WeightVariant::for_dtype(dtype),
            config_dir: None,
        }
    }

    /// With a config folder for a single-file checkpoint.
    pub fn with_config_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config_dir = Some(dir.into());
        self
    }
}

/// Where one component's weights and config are.
#[derive(Debug, Clone)]
pub struct ComponentSource {
    /// The component.
    pub component: Component,
    /// The safetensors files holding its weights (several for shards; for a single-file
    /// checkpoint, that file).
    pub files: Vec<PathBuf>,
    /// The shard index the files were listed in, if sharded.
    pub index: Option<PathBuf>,
    /// Its diffusers/transformers `config.json`; `None` for a single-file checkpoint opened
    /// without a config folder (the engine then uses the SDXL base config).
    pub config: Option<PathBuf>,
    /// Stored tensor names → the module's parameter names.
    pub key_map: KeyMap,
}

impl ComponentSource {
    /// A standalone diffusers model folder, as `ModelMixin.save_pretrained` writes it:
    /// `config.json` and `diffusion_pytorch_model[.fp16].safetensors` (or shards), preferring
    /// `variant`'s files. This is how ControlNets are distributed (e.g.
    /// `diffusers/controlnet-canny-sdxl-1.0`). Pickled weights are refused.
    pub fn model_folder(
        dir: impl AsRef<Path>,
        component: Component,
        variant: WeightVariant,
    ) -> Result<Self, ModelError> {
        let dir = dir.as_ref();
        let metadata = std::fs::metadata(dir).map_err(|e| ModelError::io(dir, e))?;
        if !metadata.is_dir() {
            return Err(ModelError::UnsupportedFormat {
                path: dir.to_owned(),
                hint: format!(
                    "a {component} must be a diffusers model folder (config.json and \
                     {}.safetensors)",
                    component.weights_stem()
                ),
            });
        }
        let config = existing(dir.join("config.json"))?;
        let (files, index) = find_weights(dir, component.weights_stem(), variant)?;
        Ok(ComponentSource {
            component,
            files,
            index,
            config: Some(config),
            key_map: KeyMap::diffusers(component),
        })
    }

    /// Fills `vs` with the weights: [`super::load_var_store`] with these files and key map.
    pub fn load(&self, vs: &mut tch::nn::VarStore) -> Result<(), ModelError> {
        super::load_var_store(vs, &self.files, &self.key_map, self.component)
    }
}

/// A model on disk: which layout, and where each component's files are.
#[derive(Debug, Clone)]
pub struct ModelSource {
    path: PathBuf,
    layout: Layout,
    components: Vec<ComponentSource>,
    tokenizer: Option<PathBuf>,
    tokenizer_2: Option<PathBuf>,
    scheduler_config: Option<PathBuf>,
}

impl ModelSource {
    /// Looks at `path` — a diffusers folder (has `model_index.json`) or a `.safetensors` SDXL
    /// checkpoint — and finds each component's files. Checks that the files exist and, for a
    /// single file, that its header is valid and names an SDXL base model; tensors are checked
    /// when loaded. Pickled weights (`.bin`, `.ckpt`, …) are refused.
    pub fn open(path: impl AsRef<Path>, options: &SourceOptions) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let metadata = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
        if metadata.is_dir() {
            if path.join("model_index.json").is_file() {
                Self::open_diffusers(path, options.variant)
            } else {
                Err(ModelError::UnsupportedFormat {
                    path: path.to_owned(),
                    hint: "a folder must be a diffusers model with model_index.json (as \
                           save_pretrained writes it); for a single-file checkpoint give the \
                           .safetensors file"
                        .to_owned(),
                })
            }
        } else {
            match extension(path).as_deref() {
                Some("safetensors") => Self::open_single_file(path, options.config_dir.as_deref()),
                Some(ext) if is_pickle_extension(ext) => Err(pickle_error(path)),
                _ => Err(ModelError::UnsupportedFormat {
                    path: path.to_owned(),
                    hint: "expected a diffusers folder or a .safetensors checkpoint".to_owned(),
                }),
            }
        }
    }

    /// The path the model was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the model is stored.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Where `component`'s weights and config are; `None` for a component outside
    /// [`Component::ALL`] (a ControlNet is not part of the base model).
    pub fn component(&self, component: Component) -> Option<&ComponentSource> {
        // `open` builds one entry per component, in `Component::ALL` order.
        self.components.get(component.slot()?)
    }

    fn required(&self, component: Component) -> Result<&ComponentSource, ModelError> {
        self.component(component)
            .ok_or_else(|| ModelError::NotFound {
                path: self.path.join(component.name()),
            })
    }

    /// `component`'s `config.json`, parsed; `None` when there is none (single file without a
    /// config folder).
    pub fn config_json(&self, component: Component) -> Result<Option<Value>, ModelError> {
        self.required(component)?
            .config
            .as_deref()
            .map(read_json)
            .transpose()
    }

    /// The first tokenizer's folder (`vocab.json` + `merges.txt` or `tokenizer.json`), if known.
    pub fn tokenizer(&self) -> Option<&Path> {
        self.tokenizer.as_deref()
    }

    /// The second tokenizer's folder, if known.
    pub fn tokenizer_2(&self) -> Option<&Path> {
        self.tokenizer_2.as_deref()
    }

    /// `scheduler/scheduler_config.json`, if known.
    pub fn scheduler_config(&self) -> Option<&Path> {
        self.scheduler_config.as_deref()
    }

    /// Fills `vs` with `component`'s weights: [`super::load_var_store`] with this source's
    /// files and key map.
    pub fn load(&self, vs: &mut tch::nn::VarStore, component: Component) -> Result<(), ModelError> {
        let source = self.required(component)?;
        super::load_var_store(vs, &source.files, &source.key_map, component)
    }

    /// Every parameter of `component` as stored, under the module's parameter names (CPU,
    /// stored dtype): [`super::read_tensors`] with this source's files and key map.
    pub fn read_component(
        &self,
        component: Component,
    ) -> Result<std::collections::HashMap<String, tch::Tensor>, ModelError> {
        let source = self.required(component)?;
        super::read_tensors(&source.files, &source.key_map, component)
    }

    fn open_diffusers(root: &Path, variant: WeightVariant) -> Result<Self, ModelError> {
        let index_path = root.join("model_index.json");
        let index = read_json(&index_path)?;
        let Value::Object(entries) = &index else {
            return Err(ModelError::invalid_config(&index_path, "not a JSON object"));
        };
        let present = |name: &str| {
            entries.get(name).is_some_and(|entry| {
                entry
                    .as_array()
                    .is_some_and(|parts| parts.iter().any(|part| !part.is_null()))
            })
        };
        let mut components = Vec::with_capacity(Component::ALL.len());
        for component in Component::ALL {
            if !present(component.name()) {
                return Err(ModelError::invalid_config(
                    &index_path,
                    format!(
                        "no {component} component (an SDXL pipeline needs unet, vae, \
                         text_encoder and text_encoder_2)"
                    ),
                ));
            }
            let dir = root.join(component.name());
            let config = existing(dir.join("config.json"))?;
            let (files, shard_index) = find_weights(&dir, component.weights_stem(), variant)?;
            components.push(ComponentSource {
                component,
                files,
                index: shard_index,
                config: Some(config),
                key_map: KeyMap::diffusers(component),
            });
        }
        for name in ["tokenizer", "tokenizer_2", "scheduler"] {
            if !present(name) {
                return Err(ModelError::invalid_config(
                    &index_path,
                    format!("no {name} component"),
                ));
            }
        }
        Ok(ModelSource {
            path: root.to_owned(),
            layout: Layout::Diffusers,
            components,
            tokenizer: Some(existing(root.join("tokenizer"))?),
            tokenizer_2: Some(existing(root.join("tokenizer_2"))?),
            scheduler_config: Some(existing(root.join("scheduler/scheduler_config.json"))?),
        })
    }

    fn open_single_file(file: &Path, config_dir: Option<&Path>) -> Result<Self, ModelError> {
        let mapped = MappedFile::open(file)?;
        let tensors = mapped.tensors()?;
        if let Some(marker) = SDXL_MARKERS
            .iter()
            .find(|marker| tensors.tensor(marker).is_err())
        {
            return Err(ModelError::UnsupportedFormat {
                path: file.to_owned(),
                hint: format!(
                    "not an SDXL base checkpoint in the original Stability naming (no tensor \
                     {marker}); SDXL in diffusers naming must be a diffusers folder"
                ),
            });
        }
        let mut components = Vec::with_capacity(Component::ALL.len());
        for component in Component::ALL {
            let (config, key_map) = match config_dir {
                Some(dir) => {
                    let path = existing(dir.join(component.name()).join("config.json"))?;
                    let json = read_json(&path)?;
                    let key_map = KeyMap::single_file_from(component, Some(&json), &path)?;
                    (Some(path), key_map)
                }
                None => (None, KeyMap::single_file(component, None)?),
            };
            components.push(ComponentSource {
                component,
                files: vec![file.to_owned()],
                index: None,
                config,
                key_map,
            });
        }
        let optional = |relative: &str| {
            config_dir
                .map(|dir| dir.join(relative))
                .filter(|path| path.exists())
        };
        Ok(ModelSource {
            path: file.to_owned(),
            layout: Layout::SingleFile,
            components,
            tokenizer: optional("tokenizer"),
            tokenizer_2: optional("tokenizer_2"),
            scheduler_config: optional("scheduler/scheduler_config.json"),
        })
    }
}

fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
}

fn is_pickle_extension(ext: &str) -> bool {
    matches!(ext, "bin" | "ckpt" | "pt" | "pth" | "pkl" | "pickle")
}

fn pickle_error(path: &Path) -> ModelError {
    ModelError::UnsupportedFormat {
        path: path.to_owned(),
        hint: "pickled PyTorch weights can run code when loaded and are not read; convert them \
               to safetensors (e.g. with diffusers: load the model and save_pretrained(..., \
               safe_serialization=True))"
            .to_owned(),
    }
}

fn existing(path: PathBuf) -> Result<PathBuf, ModelError> {
    if path.exists() {
        Ok(path)
    } else {
        Err(ModelError::NotFound { path })
    }
}

fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::invalid_config(path, e.to_string()))
}

/// The weights of one component folder, in the preferred variant if present: the files, and
/// the shard index they came from.
fn find_weights(
    dir: &Path,
    stem: &str,
    variant: WeightVariant,
) -> Result<(Vec<PathBuf>, Option<PathBuf>), ModelError> {
    if !dir.is_dir() {
        return Err(ModelError::NotFound {
            path: dir.to_owned(),
        });
    }
    let full = [
        format!("{stem}.safetensors"),
        format!("{stem}.safetensors.index.json"),
    ];
    let half = [
        format!("{stem}.fp16.safetensors"),
        format!("{stem}.safetensors.index.fp16.json"),
    ];
    let order = match variant {
        WeightVariant::Full => [&full, &half],
        WeightVariant::Fp16 => [&half, &full],
    };
    for name in order.into_iter().flatten() {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        if name.ends_with(".json") {
            let files = shard_files(&path)?;
            return Ok((files, Some(path)));
        }
        return Ok((vec![path], None));
    }
    for name in [
        format!("{stem}.bin"),
        format!("{stem}.fp16.bin"),
        format!("{stem}.bin.index.json"),
        format!("{stem}.bin.index.fp16.json"),
        format!("{stem}.ckpt"),
    ] {
        let path = dir.join(name);
        if path.is_file() {
            return Err(pickle_error(&path));
        }
    }
    Err(ModelError::NotFound {
        path: dir.join(&full[0]),
    })
}

/// The shard files a `*.safetensors.index.json` lists in its `weight_map`, in name order. Shard
/// names must be plain file names in the index's folder.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let json = read_json(index)?;
    let Some(Value::Object(weight_map)) = json.get("weight_map") else {
        return Err(ModelError::invalid_config(index, "no weight_map object"));
    };
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut names: Vec<&str> = Vec::new();
    for (tensor, file) in weight_map {
        let Some(file) = file.as_str() else {
            return Err(ModelError::invalid_config(
                index,
                format!("weight_map entry {tensor} is not a file name"),
            ));
        };
        let mut parts = Path::new(file).components();
        let plain = matches!(parts.next(), Some(PathPart::Normal(_))) && parts.next().is_none();
        if !plain || !file.ends_with(".safetensors") {
            return Err(ModelError::invalid_config(
                index,
                format!(
                    "shard {file:?} is not a .safetensors file name in {}",
                    dir.display()
                ),
            ));
        }
        names.push(file);
    }
    if names.is_empty() {
        return Err(ModelError::invalid_config(index, "empty weight_map"));
    }
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .map(|name| existing(dir.join(name)))
        .collect()
}
