//! LoRA (Hu et al. 2021, <https://arxiv.org/abs/2106.09685>) for the SDXL UNet and both text
//! encoders: low-rank updates `W ← W + weight · scale · (up @ down)` read from the files users
//! bring and fused into the weights, as diffusers' `load_lora_weights` + `set_adapters` +
//! `fuse_lora` do (`diffusers/loaders/lora_pipeline.py`, peft's `tuners/lora/layer.py`).
//!
//! Formats read ([`LoraWeights::load`]), both as `.safetensors` only:
//!
//! - **kohya / sd-scripts** ([`kohya`]): `lora_unet_…`, `lora_te1_…`, `lora_te2_…` (and SD 1.x's
//!   `lora_te_…`, taken as the first text encoder as diffusers does) with `.lora_down.weight`,
//!   `.lora_up.weight` and `.alpha`; linear and convolution layers (a k×k down with a 1×1 up).
//!   UNet modules are named either in the original SGM naming SDXL trainers use
//!   (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), resolved through the
//!   single-file checkpoint mapping of [`crate::loader::single_file`], or in diffusers' naming
//!   (`lora_unet_down_blocks_1_attentions_0_…`). The scale is `alpha / rank` per module (no alpha,
//!   or 0: `alpha = rank`, as sd-scripts does).
//! - **diffusers / PEFT** ([`peft`]): `unet.<module>.lora_A.weight` / `lora_B.weight`,
//!   `text_encoder.…`, `text_encoder_2.…`, as `StableDiffusionXLPipeline.save_lora_weights`
//!   writes them, with `lora_alpha`, `alpha_pattern` and `use_rslora` read from the
//!   `lora_adapter_metadata` header (no metadata: `alpha = rank`, scale 1); and the older
//!   diffusers spellings `….lora.down.weight`, `….lora_linear_layer.down.weight` and
//!   `….processor.to_q_lora.down.weight`.
//!
//! Every LoRA is resolved against the model it is for (a [`LoraTarget`], from
//! [`crate::pipeline::SdxlPipeline::lora_target`]) before any tensor is read: every module must
//! exist with factors that fit its weight. Anything else — a LoRA for SD 1.5, unknown keys,
//! shapes that do not fit, LyCORIS/DoRA variants — is a [`LoraError::Mismatch`] naming the keys.
//!
//! Fusing ([`LoraFuser`], owned by the pipeline) keeps a pristine copy of every weight a LoRA
//! touched and computes each adapted weight afresh from it, so switching sets is exact and one
//! pass over the adapted layers; [`LoraCache`] keeps loaded LoRAs under a memory bound.

mod cache;
mod fuse;
pub mod kohya;
pub mod peft;

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::TensorView;
use tch::{Device, Kind, Tensor, nn};

use crate::loader::single_file::UNET_PREFIX;
use crate::loader::{Component, MappedFile, ModelError, kind_of};

pub use cache::LoraCache;
pub use fuse::{LoraFuser, LoraSwitch, SwitchBenchmark, benchmark_switch};

/// How many offending keys an error message lists before "… and N more".
const LISTED_PROBLEMS: usize = 10;

/// Why a LoRA cannot be used. None of these is retryable: the file (or the request naming it)
/// has to change, except [`LoraError::File`] with an I/O error of a network file system.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// The file cannot be read or is not a valid safetensors file.
    #[error(transparent)]
    File(#[from] ModelError),
    /// A safetensors file without a single LoRA tensor.
    #[error("{}: not a LoRA file ({reason})", path.display())]
    NotALora {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// The `lora_adapter_metadata` header is not the JSON object diffusers writes.
    #[error("{}: invalid lora_adapter_metadata: {message}", path.display())]
    InvalidMetadata {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Keys that do not fit the model: unknown modules, factors of the wrong shape, variants
    /// that are not plain LoRA. Nothing was changed.
    #[error("{}", describe_mismatch(path, problems, *keys, hint.as_deref()))]
    Mismatch {
        /// The LoRA file.
        path: PathBuf,
        /// Every offending key, sorted by key.
        problems: Vec<KeyProblem>,
        /// How many tensors the file holds.
        keys: usize,
        /// What the keys suggest the LoRA was made for, when it looks like another base model.
        hint: Option<String>,
    },
    /// A `PATH[:WEIGHT]` that cannot be parsed.
    #[error("invalid LoRA {spec:?}: {reason}")]
    InvalidSpec {
        /// What was given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A LoRA weight that is not a finite number.
    #[error("{}: the LoRA weight {weight} is not a finite number", path.display())]
    InvalidWeight {
        /// The LoRA file.
        path: PathBuf,
        /// The weight given.
        weight: f64,
    },
    /// libtorch failed while fusing (for instance out of device memory). Every adapted weight
    /// was restored to the base model's value, so the model runs as without LoRAs.
    #[error(
        "libtorch failed fusing LoRAs into {component} {parameter} (the base weights were restored): {source}"
    )]
    Fuse {
        /// The component.
        component: Component,
        /// The parameter being written.
        parameter: String,
        /// libtorch's error.
        #[source]
        source: tch::TchError,
    },
}

fn describe_mismatch(
    path: &Path,
    problems: &[KeyProblem],
    keys: usize,
    hint: Option<&str>,
) -> String {
    let mut message = format!(
        "{}: {} of its {keys} tensors do not fit this model",
        path.display(),
        problems.len()
    );
    if let Some(hint) = hint {
        message.push_str(&format!(" ({hint})"));
    }
    message.push(':');
    for problem in problems.iter().take(LISTED_PROBLEMS) {
        message.push_str(&format!("\n  {problem}"));
    }
    if problems.len() > LISTED_PROBLEMS {
        message.push_str(&format!(
            "\n  … and {} more",
            problems.len() - LISTED_PROBLEMS
        ));
    }
    message
}

/// One key of a LoRA file that does not fit, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyProblem {
    /// The tensor's name in the file.
    pub key: String,
    /// What is wrong.
    pub problem: Problem,
}

impl fmt::Display for KeyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.problem)
    }
}

/// What is wrong with a [`KeyProblem`]'s key.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    /// A name that is not a LoRA tensor in any supported format.
    UnknownKey,
    /// A LoRA module the model does not have.
    UnknownModule {
        /// The component the key is for.
        component: Component,
    },
    /// A kohya module name that stands for more than one parameter of the model.
    AmbiguousModule {
        /// The component the key is for.
        component: Component,
    },
    /// A LoRA variant other than plain low-rank factors (DoRA, LoHa, LoKr, …).
    Unsupported {
        /// The variant.
        kind: &'static str,
    },
    /// A module with a down factor and no up factor, or the reverse, or an alpha alone.
    MissingFactor {
        /// The factor that is missing (`down`, `up`).
        missing: &'static str,
    },
    /// A second module spelling for a parameter another key already adapts.
    Duplicate {
        /// The parameter.
        parameter: String,
        /// The other key.
        other: String,
    },
    /// Factors whose shapes do not give the parameter's shape.
    Shape {
        /// The parameter (diffusers/transformers name).
        parameter: String,
        /// The parameter's shape.
        expected: Vec<i64>,
        /// The down factor's shape.
        down: Vec<i64>,
        /// The up factor's shape.
        up: Vec<i64>,
    },
    /// A tensor stored in a dtype that is not a float.
    DType {
        /// The stored dtype.
        dtype: String,
    },
    /// An alpha that is not a single finite number.
    InvalidAlpha,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::UnknownKey => f.write_str("not a LoRA tensor name"),
            Problem::UnknownModule { component } => write!(f, "{component} has no such module"),
            Problem::AmbiguousModule { component } => {
                write!(f, "names more than one module of {component}")
            }
            Problem::Unsupported { kind } => write!(f, "{kind} is not supported (plain LoRA only)"),
            Problem::MissingFactor { missing } => write!(f, "no {missing} factor for this module"),
            Problem::Duplicate { parameter, other } => {
                write!(f, "{parameter} is already adapted by {other}")
            }
            Problem::Shape {
                parameter,
                expected,
                down,
                up,
            } => write!(
                f,
                "down {down:?} and up {up:?} do not fit {parameter} {expected:?}"
            ),
            Problem::DType { dtype } => write!(f, "dtype {dtype} (need a float)"),
            Problem::InvalidAlpha => f.write_str("alpha is not a single finite number"),
        }
    }
}

/// Which of a module's tensors a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    /// `lora_down` / `lora_A`: `(rank, in[, kh, kw])`.
    Down,
    /// `lora_up` / `lora_B`: `(out, rank[, 1, 1])`.
    Up,
    /// kohya's `alpha`: the scale is `alpha / rank`.
    Alpha,
}

/// A module as a LoRA file names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ModuleName {
    /// kohya: the module path with `.` written as `_` (`down_blocks_1_attentions_0_…` or the
    /// SGM `input_blocks_4_1_…`), resolved by lookup.
    Flat(String),
    /// diffusers/PEFT: the module path (`down_blocks.1.attentions.0.…`).
    Dotted(String),
}

impl fmt::Display for ModuleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModuleName::Flat(name) | ModuleName::Dotted(name) => f.write_str(name),
        }
    }
}

/// What a key of a LoRA file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedKey {
    /// A factor or alpha of one module.
    Entry {
        /// The component it adapts.
        component: Component,
        /// The module.
        module: ModuleName,
        /// Which tensor of the module.
        factor: Factor,
    },
    /// A tensor of a LoRA variant this engine does not fuse.
    Unsupported(&'static str),
    /// Not a LoRA tensor.
    Unknown,
}

/// The file format a LoRA was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya / sd-scripts keys.
    Kohya,
    /// diffusers' PEFT keys (`lora_A` / `lora_B`).
    Peft,
    /// diffusers' older keys (`lora.down`, `lora_linear_layer.down`, `to_q_lora.down`).
    DiffusersLegacy,
}

/// The components a LoRA can adapt, in [`Component`] terms.
const ADAPTED: [Component; 3] = [
    Component::TextEncoder,
    Component::TextEncoder2,
    Component::Unet,
];

/// The adaptable parameters of one component.
#[derive(Debug, Clone)]
struct ComponentTarget {
    /// Variable name → shape, for every weight of two or more dimensions.
    parameters: HashMap<String, Vec<i64>>,
    /// kohya's flattened module name → variable name (`None`: several).
    flat: HashMap<String, Option<String>>,
}

/// The model LoRAs are resolved against: the weights of the UNet and both text encoders (names
/// and shapes), with the lookup tables kohya's flattened names need.
#[derive(Debug, Clone)]
pub struct LoraTarget {
    components: Vec<(Component, ComponentTarget)>,
    device: Device,
    kind: Kind,
    fingerprint: u64,
    /// Why SGM UNet names cannot be resolved (the UNet config has no single-file mapping).
    sgm_unavailable: Option<String>,
}

fn flatten(name: &str) -> String {
    name.replace('.', "_")
}

fn insert_flat(flat: &mut HashMap<String, Option<String>>, key: String, parameter: &str) {
    flat.entry(key)
        .and_modify(|existing| {
            if existing.as_deref() != Some(parameter) {
                *existing = None;
            }
        })
        .or_insert_with(|| Some(parameter.to_owned()));
}

impl LoraTarget {
    /// The target of a model whose components' weights are in `stores` (the VAE's, if given, is
    /// ignored). `unet_config` is the UNet's diffusers config, for SGM-named kohya keys (`None`:
    /// SDXL base's layout).
    pub fn new(
        stores: &[(Component, &nn::VarStore)],
        unet_config: Option<&serde_json::Value>,
    ) -> Self {
        let mut components = Vec::new();
        let mut device = Device::Cpu;
        let mut kind = Kind::Float;
        let mut sgm_unavailable = None;
        let mut hasher = DefaultHasher::new();
        for &(component, vs) in stores {
            if !ADAPTED.contains(&component) {
                continue;
            }
            device = vs.device();
            kind = vs.kind();
            let mut parameters = HashMap::new();
            let mut flat = HashMap::new();
            let rules = match component {
                Component::Unet => {
                    match crate::loader::single_file::Rules::new(component, unet_config) {
                        Ok(rules) => Some(rules),
                        Err(reason) => {
                            sgm_unavailable = Some(reason);
                            None
                        }
                    }
                }
                _ => None,
            };
            let mut variables: Vec<(String, Vec<i64>)> = vs
                .variables()
                .into_iter()
                .map(|(name, tensor)| (name, tensor.size()))
                .collect();
            variables.sort();
            for (name, shape) in variables {
                if shape.len() < 2 {
                    continue;
                }
                let Some(module) = name.strip_suffix(".weight") else {
                    continue;
                };
                insert_flat(&mut flat, flatten(module), &name);
                if let Some(stripped) = module.strip_prefix("text_model.") {
                    insert_flat(&mut flat, flatten(stripped), &name);
                }
                if let Some(stored) = rules.as_ref().and_then(|r| r.stored_name(&name)) {
                    let stored = stored
                        .strip_prefix(UNET_PREFIX)
                        .and_then(|s| s.strip_suffix(".weight"));
                    if let Some(stored) = stored {
                        insert_flat(&mut flat, flatten(stored), &name);
                    }
                }
                (component, &name, &shape).hash(&mut hasher);
                parameters.insert(name, shape);
            }
            components.push((component, ComponentTarget { parameters, flat }));
        }
        format!("{device:?} {kind:?}").hash(&mut hasher);
        LoraTarget {
            components,
            device,
            kind,
            fingerprint: hasher.finish(),
            sgm_unavailable,
        }
    }

    /// The device the model (and LoRAs loaded for it) are on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The dtype of the model's weights, which LoRA factors are converted to.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The shape of `component`'s parameter `name`, if it is adaptable.
    pub fn parameter_shape(&self, component: Component, name: &str) -> Option<&[i64]> {
        self.component(component)?
            .parameters
            .get(name)
            .map(Vec::as_slice)
    }

    /// Why kohya keys in the original SGM UNet naming cannot be resolved for this model (its
    /// UNet config has block types the single-file mapping does not know), if so.
    pub fn sgm_unavailable(&self) -> Option<&str> {
        self.sgm_unavailable.as_deref()
    }

    /// Identifies the model's parameter names, shapes and device (within one process).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    fn component(&self, component: Component) -> Option<&ComponentTarget> {
        self.components
            .iter()
            .find(|(c, _)| *c == component)
            .map(|(_, t)| t)
    }

    /// The variable a module names, or why none.
    fn resolve(&self, component: Component, module: &ModuleName) -> Result<String, Problem> {
        let unknown = Problem::UnknownModule { component };
        let target = self.component(component).ok_or(unknown.clone())?;
        match module {
            ModuleName::Flat(flat) => match target.flat.get(flat) {
                Some(Some(name)) => Ok(name.clone()),
                Some(None) => Err(Problem::AmbiguousModule { component }),
                None => Err(unknown),
            },
            ModuleName::Dotted(dotted) => {
                let mut candidates = vec![format!("{dotted}.weight")];
                if matches!(component, Component::TextEncoder | Component::TextEncoder2) {
                    // transformers ≥ 5 names CLIPTextModel's modules without `text_model.`.
                    match dotted.strip_prefix("text_model.") {
                        Some(stripped) => candidates.push(format!("{stripped}.weight")),
                        None => candidates.push(format!("text_model.{dotted}.weight")),
                    }
                }
                candidates
                    .into_iter()
                    .find(|name| target.parameters.contains_key(name))
                    .ok_or(unknown)
            }
        }
    }
}

/// One adapted parameter: `ΔW = scale · (up @ down)`, reshaped to the parameter's shape.
#[derive(Debug)]
pub struct LoraModule {
    component: Component,
    parameter: String,
    shape: Vec<i64>,
    down: Tensor,
    up: Tensor,
    /// `down` as `[1, rank, in·kh·kw]` and `up` as `[1, out, rank]` (views).
    matrices: (Tensor, Tensor),
    rank: i64,
    alpha: f64,
    rslora: bool,
}

impl LoraModule {
    /// The component adapted.
    pub fn component(&self) -> Component {
        self.component
    }

    /// The parameter adapted (the name of its variable in the component's var store).
    pub fn parameter(&self) -> &str {
        &self.parameter
    }

    /// The parameter's shape.
    pub fn shape(&self) -> &[i64] {
        &self.shape
    }

    /// The down factor, `(rank, in[, kh, kw])`, on the model's device in its dtype.
    pub fn down(&self) -> &Tensor {
        &self.down
    }

    /// The up factor, `(out, rank[, 1, 1])`, on the model's device in its dtype.
    pub fn up(&self) -> &Tensor {
        &self.up
    }

    /// `(up, down)` as batched matrices, `[1, out, rank]` and `[1, rank, in·kh·kw]`: one
    /// `baddbmm` adds `scale · up @ down` to a `[1, out, in·kh·kw]` weight.
    pub(crate) fn matrices(&self) -> (&Tensor, &Tensor) {
        (&self.matrices.0, &self.matrices.1)
    }

    /// The rank.
    pub fn rank(&self) -> i64 {
        self.rank
    }

    /// The alpha the scale derives from.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// `weight · alpha / rank` (`/ √rank` for rank-stabilised LoRA), as peft's `set_scale`
    /// computes it for an adapter weight.
    pub fn scale(&self, weight: f64) -> f64 {
        let rank = self.rank as f64;
        if self.rslora {
            weight * self.alpha / rank.sqrt()
        } else {
            weight * self.alpha / rank
        }
    }

    fn bytes(&self) -> usize {
        [&self.down, &self.up]
            .iter()
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }
}

/// The next [`LoraWeights::id`].
static NEXT_LORA_ID: AtomicU64 = AtomicU64::new(0);

/// A LoRA read from a file and resolved against a model ([`LoraTarget`]): per adapted parameter,
/// its low-rank factors (on the model's device, in its dtype) and scale.
#[derive(Debug)]
pub struct LoraWeights {
    id: u64,
    path: PathBuf,
    format: LoraFormat,
    modules: Vec<LoraModule>,
    fingerprint: u64,
}

/// One module's tensors while a file is read.
#[derive(Default)]
struct Group<'a> {
    down: Option<(String, TensorView<'a>)>,
    up: Option<(String, TensorView<'a>)>,
    alpha: Option<(String, TensorView<'a>)>,
}

impl Group<'_> {
    fn first_key(&self) -> String {
        [&self.down, &self.up, &self.alpha]
            .into_iter()
            .flatten()
            .map(|(key, _)| key.clone())
            .next()
            .unwrap_or_default()
    }
}

fn shape_of(view: &TensorView<'_>) -> Vec<i64> {
    view.shape()
        .iter()
        .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
        .collect()
}

fn tensor_of(view: &TensorView<'_>) -> Result<Tensor, tch::TchError> {
    let kind = kind_of(view.dtype())
        .ok_or_else(|| tch::TchError::Kind(format!("{:?} is not a float", view.dtype())))?;
    Tensor::f_from_data_size(view.data(), &shape_of(view), kind)
}

/// Whether factors of these shapes give a parameter of shape `parameter` (linear or k×k
/// convolution with a 1×1 up; a 1×1 convolution may be adapted by linear factors and back).
pub fn factors_fit(parameter: &[i64], down: &[i64], up: &[i64]) -> bool {
    let (Some(&rank), Some(&up_rank)) = (down.first(), up.get(1)) else {
        return false;
    };
    let ones = |dims: &[i64]| dims.iter().all(|&d| d == 1);
    if rank <= 0 || up_rank != rank || !ones(&up[2..]) || up.first() != parameter.first() {
        return false;
    }
    match (parameter.len(), down.len()) {
        (2, 2) => down[1] == parameter[1],
        (4, 4) => down[1..] == parameter[1..],
        (4, 2) => down[1] == parameter[1] && ones(&parameter[2..]),
        (2, 4) => down[1] == parameter[1] && ones(&down[2..]),
        _ => false,
    }
}

/// Reads `alpha` from a scalar (or one-element) float tensor.
fn alpha_value(view: &TensorView<'_>) -> Option<f64> {
    if view.shape().iter().product::<usize>() != 1 {
        return None;
    }
    let value = tensor_of(view)
        .and_then(|t| t.f_reshape([1]))
        .and_then(|t| t.f_double_value(&[0]))
        .ok()?;
    value.is_finite().then_some(value)
}

fn parse_key(key: &str) -> ParsedKey {
    kohya::parse(key).unwrap_or_else(|| peft::parse(key))
}

/// A file's LoRA keys grouped by module, and the keys that are not LoRA factors.
struct Grouped<'a> {
    groups: BTreeMap<(Component, ModuleName), Group<'a>>,
    problems: Vec<KeyProblem>,
    format: LoraFormat,
}

/// Sorts a file's tensors into modules by their key names.
fn group_keys(stored: Vec<(String, TensorView<'_>)>) -> Grouped<'_> {
    let mut groups: BTreeMap<(Component, ModuleName), Group<'_>> = BTreeMap::new();
    let mut problems = Vec::new();
    let (mut kohya_keys, mut peft_keys) = (0, 0);
    for (key, view) in stored {
        let problem = |problem| KeyProblem {
            key: key.clone(),
            problem,
        };
        let (component, module, factor) = match parse_key(&key) {
            ParsedKey::Entry {
                component,
                module,
                factor,
            } => (component, module, factor),
            ParsedKey::Unsupported(kind) => {
                problems.push(problem(Problem::Unsupported { kind }));
                continue;
            }
            ParsedKey::Unknown => {
                problems.push(problem(Problem::UnknownKey));
                continue;
            }
        };
        if kind_of(view.dtype()).is_none() {
            problems.push(problem(Problem::DType {
                dtype: format!("{:?}", view.dtype()),
            }));
            continue;
        }
        match &module {
            ModuleName::Flat(_) => kohya_keys += 1,
            ModuleName::Dotted(_) if key.contains(".lora_A.") || key.contains(".lora_B.") => {
                peft_keys += 1
            }
            ModuleName::Dotted(_) => {}
        }
        let label = format!("{component} {module}");
        let group = groups.entry((component, module)).or_default();
        let slot = match factor {
            Factor::Down => &mut group.down,
            Factor::Up => &mut group.up,
            Factor::Alpha => &mut group.alpha,
        };
        if let Some((other, _)) = slot {
            problems.push(problem(Problem::Duplicate {
                parameter: label,
                other: other.clone(),
            }));
            continue;
        }
        *slot = Some((key.clone(), view));
    }
    let format = if kohya_keys > 0 {
        LoraFormat::Kohya
    } else if peft_keys > 0 {
        LoraFormat::Peft
    } else {
        LoraFormat::DiffusersLegacy
    };
    Grouped {
        groups,
        problems,
        format,
    }
}

/// A module checked against the model, its factors still in the file.
struct Resolved<'a> {
    component: Component,
    parameter: String,
    shape: Vec<i64>,
    down: TensorView<'a>,
    up: TensorView<'a>,
    rank: i64,
    alpha: f64,
    rslora: bool,
}

/// Checks one module against the model: it exists, has both factors of fitting shapes, is not
/// adapted twice (`adapted`: parameter → key), and has a valid alpha; derives the alpha.
fn resolve_group<'a>(
    target: &LoraTarget,
    adapters: &peft::AdapterConfigs,
    (component, module): (Component, ModuleName),
    group: Group<'a>,
    adapted: &mut HashMap<(Component, String), String>,
) -> Result<Resolved<'a>, KeyProblem> {
    let key = group.first_key();
    let problem = |key: &str, problem| KeyProblem {
        key: key.to_owned(),
        problem,
    };
    let parameter = target
        .resolve(component, &module)
        .map_err(|p| problem(&key, p))?;
    let config = adapters.get(component);
    if config.is_some_and(|c| c.use_dora) {
        return Err(problem(&key, Problem::Unsupported { kind: "DoRA" }));
    }
    let missing = if group.down.is_none() { "down" } else { "up" };
    let Group { down, up, alpha } = group;
    let (Some((down_key, down)), Some((_, up))) = (down, up) else {
        return Err(problem(&key, Problem::MissingFactor { missing }));
    };
    let shape = target
        .parameter_shape(component, &parameter)
        .map(<[i64]>::to_vec)
        .unwrap_or_default();
    let (down_shape, up_shape) = (shape_of(&down), shape_of(&up));
    if !factors_fit(&shape, &down_shape, &up_shape) {
        return Err(problem(
            &down_key,
            Problem::Shape {
                parameter,
                expected: shape,
                down: down_shape,
                up: up_shape,
            },
        ));
    }
    if let Some(other) = adapted.insert((component, parameter.clone()), down_key.clone()) {
        return Err(problem(&down_key, Problem::Duplicate { parameter, other }));
    }
    let rank = down_shape[0];
    let explicit_alpha = match &alpha {
        Some((alpha_key, view)) => {
            Some(alpha_value(view).ok_or_else(|| problem(alpha_key, Problem::InvalidAlpha))?)
        }
        None => None,
    };
    let (alpha, rslora) = match &module {
        // sd-scripts: no alpha, or 0, means alpha = rank (scale 1).
        ModuleName::Flat(_) => (
            explicit_alpha.filter(|&a| a != 0.0).unwrap_or(rank as f64),
            false,
        ),
        ModuleName::Dotted(name) => (
            explicit_alpha
                .or_else(|| config.and_then(|c| c.alpha_for(name)))
                .unwrap_or(rank as f64),
            config.is_some_and(|c| c.use_rslora),
        ),
    };
    Ok(Resolved {
        component,
        parameter,
        shape,
        down,
        up,
        rank,
        alpha,
        rslora,
    })
}

/// Copies the validated factors out of the file onto `device`.
fn copy_factors(
    path: &Path,
    resolved: Vec<Resolved<'_>>,
    device: Device,
    kind: Kind,
) -> Result<Vec<LoraModule>, LoraError> {
    let torch = |source| ModelError::CorruptFile {
        path: path.to_owned(),
        message: format!("cannot copy a LoRA factor: {source}"),
    };
    let mut modules = Vec::with_capacity(resolved.len());
    for r in resolved {
        let down = tensor_of(&r.down)
            .and_then(|t| t.f_to_device(device)?.f_to_kind(kind))
            .map_err(torch)?;
        let up = tensor_of(&r.up)
            .and_then(|t| t.f_to_device(device)?.f_to_kind(kind))
            .map_err(torch)?;
        let matrices = (
            up.f_view([1, up.size()[0], -1]).map_err(torch)?,
            down.f_view([1, down.size()[0], -1]).map_err(torch)?,
        );
        modules.push(LoraModule {
            component: r.component,
            parameter: r.parameter,
            shape: r.shape,
            down,
            up,
            matrices,
            rank: r.rank,
            alpha: r.alpha,
            rslora: r.rslora,
        });
    }
    modules.sort_by(|a, b| (a.component, &a.parameter).cmp(&(b.component, &b.parameter)));
    Ok(modules)
}

impl LoraWeights {
    /// Reads a LoRA `.safetensors` file and resolves it against `target`, the model it is for;
    /// the factors are put on the target's device.
    ///
    /// Every key is checked before any tensor is copied: the error lists every key that does not
    /// fit ([`LoraError::Mismatch`]).
    pub fn load(path: &Path, target: &LoraTarget) -> Result<Self, LoraError> {
        let file = MappedFile::open(path)?;
        let tensors = file.tensors()?;
        let metadata = file.metadata()?;
        let adapters =
            peft::AdapterConfigs::from_metadata(metadata.as_ref()).map_err(|message| {
                LoraError::InvalidMetadata {
                    path: path.to_owned(),
                    message,
                }
            })?;
        let mut stored = tensors.tensors();
        stored.sort_by(|a, b| a.0.cmp(&b.0));
        let keys = stored.len();

        let Grouped {
            groups,
            mut problems,
            format,
        } = group_keys(stored);
        if groups.is_empty() && problems.iter().all(|p| p.problem == Problem::UnknownKey) {
            return Err(LoraError::NotALora {
                path: path.to_owned(),
                reason: format!("none of its {keys} tensors is named as a LoRA factor"),
            });
        }
        let mut resolved = Vec::with_capacity(groups.len());
        let mut adapted = HashMap::new();
        for (module, group) in groups {
            match resolve_group(target, &adapters, module, group, &mut adapted) {
                Ok(module) => resolved.push(module),
                Err(problem) => problems.push(problem),
            }
        }
        if !problems.is_empty() {
            problems.sort_by(|a, b| a.key.cmp(&b.key));
            let hint = base_model_hint(&problems, &tensors);
            return Err(LoraError::Mismatch {
                path: path.to_owned(),
                problems,
                keys,
                hint,
            });
        }

        Ok(LoraWeights {
            id: NEXT_LORA_ID.fetch_add(1, Ordering::Relaxed),
            path: path.to_owned(),
            format,
            modules: copy_factors(path, resolved, target.device(), target.kind())?,
            fingerprint: target.fingerprint(),
        })
    }

    /// A number no other `LoraWeights` of this process has (what a pipeline remembers of the
    /// LoRAs its text encoders were computed with).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether it adapts either text encoder.
    pub fn adapts_text_encoders(&self) -> bool {
        self.modules.iter().any(|m| {
            matches!(
                m.component(),
                Component::TextEncoder | Component::TextEncoder2
            )
        })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key format of the file.
    pub fn format(&self) -> LoraFormat {
        self.format
    }

    /// The adapted parameters, sorted by component and name.
    pub fn modules(&self) -> &[LoraModule] {
        &self.modules
    }

    /// Bytes held by the factors.
    pub fn bytes(&self) -> usize {
        self.modules.iter().map(LoraModule::bytes).sum()
    }

    /// The [`LoraTarget::fingerprint`] of the model it was resolved against.
    pub fn target_fingerprint(&self) -> u64 {
        self.fingerprint
    }
}

/// A guess at the base model a mismatching LoRA was made for, from SD 1.x/2.x traits: one text
/// encoder (`lora_te_`) and cross-attention keys 768 (SD 1.x) or 1024 (SD 2.x) wide.
fn base_model_hint(
    problems: &[KeyProblem],
    tensors: &safetensors::SafeTensors<'_>,
) -> Option<String> {
    let names = tensors.names();
    let single_text_encoder = names.iter().any(|n| n.starts_with("lora_te_"))
        && !names.iter().any(|n| n.starts_with("lora_te2_"));
    let cross_attention_width = problems.iter().find_map(|p| {
        let flat = p.key.replace('.', "_");
        let cross_attention = flat.contains("attn2_to_k") || flat.contains("attn2_to_v");
        let down =
            flat.contains("lora_down") || flat.contains("lora_A") || flat.contains("layer_down");
        if !(cross_attention && down) {
            return None;
        }
        tensors.tensor(&p.key).ok()?.shape().get(1).copied()
    });
    match (cross_attention_width, single_text_encoder) {
        (Some(768), _) => Some(
            "its cross-attention keys are 768 wide: a LoRA for Stable Diffusion 1.x, not SDXL"
                .to_owned(),
        ),
        (Some(1024), _) => Some(
            "its cross-attention keys are 1024 wide: a LoRA for Stable Diffusion 2.x, not SDXL"
                .to_owned(),
        ),
        (_, true) => Some(
            "it adapts a single text encoder (lora_te_): a LoRA for Stable Diffusion 1.x/2.x, not SDXL"
                .to_owned(),
        ),
        _ => None,
    }
}

/// A LoRA file and its weight, as the command line and requests give it: `PATH[:WEIGHT]`.
///
/// The text after the last `:` is the weight when it parses as a number (so paths may contain
/// `:`); otherwise the whole text is the path and the weight is 1.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// The `.safetensors` file.
    pub path: PathBuf,
    /// How strongly to apply it (1: as trained).
    pub weight: f64,
}

impl FromStr for LoraSpec {
    type Err = LoraError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| LoraError::InvalidSpec {
            spec: spec.to_owned(),
            reason: reason.to_owned(),
        };
        let (path, weight) = match spec.rsplit_once(':') {
            Some((path, weight)) => match weight.trim().parse::<f64>() {
                Ok(weight) if weight.is_finite() => (path, weight),
                Ok(_) => return Err(invalid("the weight must be a finite number")),
                Err(_) => (spec, 1.0),
            },
            None => (spec, 1.0),
        };
        if path.is_empty() {
            return Err(invalid("no path"));
        }
        Ok(LoraSpec {
            path: PathBuf::from(path),
            weight,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn specs_take_the_weight_after_the_last_colon() {
        let spec = |s: &str| s.parse::<LoraSpec>().unwrap();
        assert_eq!(spec("a.safetensors").weight, 1.0);
        assert_eq!(spec("a.safetensors:0.7").weight, 0.7);
        assert_eq!(spec("a.safetensors:-1").weight, -1.0);
        assert_eq!(
            spec("/m:x/a.safetensors:.5").path,
            PathBuf::from("/m:x/a.safetensors")
        );
        assert_eq!(
            spec("/m:x/a.safetensors").path,
            PathBuf::from("/m:x/a.safetensors")
        );
        assert_eq!(spec("/m:x/a.safetensors").weight, 1.0);
        assert!("a.safetensors:inf".parse::<LoraSpec>().is_err());
        assert!("a.safetensors:NaN".parse::<LoraSpec>().is_err());
        assert!(":0.5".parse::<LoraSpec>().is_err());
    }

    #[test]
    fn factor_shapes() {
        assert!(factors_fit(&[8, 6], &[4, 6], &[8, 4]));
        assert!(!factors_fit(&[8, 6], &[4, 6], &[8, 3]));
        assert!(!factors_fit(&[8, 6], &[4, 7], &[8, 4]));
        assert!(!factors_fit(&[8, 6], &[4, 6], &[9, 4]));
        assert!(factors_fit(&[8, 6, 3, 3], &[4, 6, 3, 3], &[8, 4, 1, 1]));
        assert!(!factors_fit(&[8, 6, 3, 3], &[4, 6, 1, 1], &[8, 4, 1, 1]));
        assert!(!factors_fit(&[8, 6, 3, 3], &[4, 6, 3, 3], &[8, 4, 3, 3]));
        assert!(factors_fit(&[8, 6, 1, 1], &[4, 6], &[8, 4]));
        assert!(factors_fit(&[8, 6], &[4, 6, 1, 1], &[8, 4, 1, 1]));
        assert!(!factors_fit(&[8], &[4, 8], &[8, 4]));
        assert!(!factors_fit(&[8, 6], &[0, 6], &[8, 0]));
    }
}
