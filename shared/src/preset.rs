//! Studio presets: plain TOML files that say what a job looks like.
//!
//! Preprocess reads the face framing, the resolution policy and the ControlNet kinds; inference
//! reads the prompt, LoRAs, ControlNets, sampling parameters and tone. The format, with every
//! field's default and range, is documented in `shared/presets/README.md`.
//!
//! A [`PresetLibrary`] holds the built-in presets (embedded from `shared/presets/*.toml`) and,
//! optionally, an operator's directory of presets that override built-ins of the same name.
//! LoRA, ControlNet and LUT names are plain file or folder names, resolved later under the
//! configured model directories; nothing is downloaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use darkroom_events::FailureReason;
use serde::{Deserialize, Serialize};

/// Scheduler names the inference function accepts (its `SchedulerKind`).
pub const SCHEDULERS: [&str; 4] = ["euler", "euler-a", "dpmpp-2m-karras", "ddim"];

/// The placeholder a prompt template may contain, replaced by [`Preset::render_prompt`].
pub const SUBJECT_PLACEHOLDER: &str = "{subject}";

/// Longest subject kept, in characters; the rest is dropped.
pub const MAX_SUBJECT_CHARS: usize = 200;

/// A subject as it may fill [`SUBJECT_PLACEHOLDER`] (and travel as the upload's
/// `x-amz-meta-subject`, an HTTP header): one line (control characters become spaces), trimmed,
/// at most [`MAX_SUBJECT_CHARS`] characters; `None` when nothing is left.
pub fn clean_subject(raw: &str) -> Option<String> {
    let cleaned: String = raw
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_SUBJECT_CHARS)
        .collect();
    let cleaned = cleaned.trim();
    (!cleaned.is_empty()).then(|| cleaned.to_owned())
}

/// The built-in presets, by name, embedded at build time.
const BUILTIN: [(&str, &str); 4] = [
    ("desk-setup", include_str!("../presets/desk-setup.toml")),
    ("profile-cool", include_str!("../presets/profile-cool.toml")),
    ("profile-warm", include_str!("../presets/profile-warm.toml")),
    ("storybook", include_str!("../presets/storybook.toml")),
];

/// Errors reading, validating or looking up presets.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PresetError {
    /// The file is not valid TOML or not of the preset shape (an unknown field, a wrong type).
    #[error("preset {name}: {message}")]
    Parse {
        /// The preset (file stem).
        name: String,
        /// What the TOML parser said.
        message: String,
    },
    /// A field is out of range or inconsistent.
    #[error("preset {name}: {field}: {message}")]
    Invalid {
        /// The preset.
        name: String,
        /// The field, as a TOML path (`controlnets[0].scale`).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// No preset of that name.
    #[error("unknown preset {name:?} (known: {})", known.join(", "))]
    Unknown {
        /// The name asked for.
        name: String,
        /// Every preset the library holds.
        known: Vec<String>,
    },
    /// A preset directory or file could not be read.
    #[error("preset directory {}: {message}", path.display())]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// What the system said.
        message: String,
    },
}

impl PresetError {
    /// The failure reason a job gets when this error stops it: `unknown_preset` for a name the
    /// library does not hold, `internal` for a broken preset (an operator's mistake, not the
    /// upload's). Never worth retrying either way.
    pub fn reason(&self) -> FailureReason {
        match self {
            PresetError::Unknown { .. } => FailureReason::UnknownPreset,
            PresetError::Parse { .. } | PresetError::Invalid { .. } | PresetError::Io { .. } => {
                FailureReason::Internal
            }
        }
    }
}

/// A studio preset. Unknown fields are errors, so a typo never silently falls back to a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// The preset's name; must equal its file stem.
    pub name: String,
    /// For people (default empty).
    #[serde(default)]
    pub description: String,
    /// Prompt template; may contain `{subject}` (see [`Preset::render_prompt`]).
    pub prompt: String,
    /// Negative prompt (default empty).
    #[serde(default)]
    pub negative_prompt: String,
    /// Denoising steps, 1–150 (default 30).
    #[serde(default = "default_steps")]
    pub steps: u32,
    /// Classifier-free guidance scale, 0–30 (default 5.0).
    #[serde(default = "default_guidance")]
    pub guidance: f64,
    /// Scheduler, one of [`SCHEDULERS`] (default `dpmpp-2m-karras`).
    #[serde(default = "default_scheduler")]
    pub scheduler: String,
    /// Image-to-image strength in (0, 1]; none means text-to-image, the upload only framing the
    /// job and feeding the control maps (default none).
    #[serde(default)]
    pub strength: Option<f64>,
    /// Output size policy (default: nearest SDXL bucket).
    #[serde(default)]
    pub resolution: Resolution,
    /// Portrait framing; none means the preset does not look for faces (default none).
    #[serde(default)]
    pub face: Option<FaceFraming>,
    /// LoRAs applied to the UNet and text encoders (default none).
    #[serde(default)]
    pub loras: Vec<Lora>,
    /// ControlNets, each conditioned on a control map preprocess makes (default none).
    #[serde(default)]
    pub controlnets: Vec<ControlNet>,
    /// Colour post-process (default none).
    #[serde(default)]
    pub tone: Option<Tone>,
}

fn default_steps() -> u32 {
    30
}

fn default_guidance() -> f64 {
    5.0
}

fn default_scheduler() -> String {
    "dpmpp-2m-karras".to_owned()
}

/// How the output size is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "ResolutionRepr", into = "ResolutionRepr")]
pub enum Resolution {
    /// The SDXL resolution bucket (~1 MP) nearest the input's aspect ratio (`"bucket"`).
    #[default]
    Bucket,
    /// A fixed size (`{ width = 1024, height = 1024 }`), each a multiple of 8 in 256–4096.
    Fixed {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum ResolutionRepr {
    Policy(String),
    Fixed { width: u32, height: u32 },
}

impl TryFrom<ResolutionRepr> for Resolution {
    type Error = String;

    fn try_from(repr: ResolutionRepr) -> Result<Self, String> {
        match repr {
            ResolutionRepr::Policy(policy) if policy == "bucket" => Ok(Resolution::Bucket),
            ResolutionRepr::Policy(other) => Err(format!(
                "resolution {other:?}: expected \"bucket\" or {{ width, height }}"
            )),
            ResolutionRepr::Fixed { width, height } => Ok(Resolution::Fixed { width, height }),
        }
    }
}

impl From<Resolution> for ResolutionRepr {
    fn from(resolution: Resolution) -> Self {
        match resolution {
            Resolution::Bucket => ResolutionRepr::Policy("bucket".to_owned()),
            Resolution::Fixed { width, height } => ResolutionRepr::Fixed { width, height },
        }
    }
}

/// Portrait framing: the face centred and scaled so its box is `head_ratio` of the height.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaceFraming {
    /// Exactly one face is needed: none fails with `no_face_found`, several with
    /// `multiple_faces`. When false, a single face is framed and anything else is left as is
    /// (default true).
    #[serde(default = "default_true")]
    pub required: bool,
    /// Face box height / image height, in (0, 1) (default 0.35).
    #[serde(default = "default_head_ratio")]
    pub head_ratio: f64,
    /// Rotate so the eye line is horizontal when landmarks allow (default true).
    #[serde(default = "default_true")]
    pub eyes_level: bool,
}

fn default_true() -> bool {
    true
}

fn default_head_ratio() -> f64 {
    0.35
}

/// A LoRA adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lora {
    /// A file name (`storybook-style.safetensors`) resolved under the configured LoRA directory.
    pub name: String,
    /// Scale, any finite number (default 1.0).
    #[serde(default = "default_one")]
    pub weight: f64,
}

fn default_one() -> f64 {
    1.0
}

/// What a control map shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlKind {
    /// Canny edges.
    Canny,
    /// A depth map.
    Depth,
    /// An OpenPose skeleton.
    Pose,
}

impl ControlKind {
    /// The TOML name.
    pub fn as_str(self) -> &'static str {
        match self {
            ControlKind::Canny => "canny",
            ControlKind::Depth => "depth",
            ControlKind::Pose => "pose",
        }
    }
}

/// A ControlNet and when it acts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlNet {
    /// The control map it is conditioned on.
    pub kind: ControlKind,
    /// A folder name resolved under the configured ControlNet directory.
    pub model: String,
    /// Conditioning scale, ≥ 0 (default 1.0).
    #[serde(default = "default_one")]
    pub scale: f64,
    /// Fraction of the steps at which it starts, in [0, end) (default 0.0).
    #[serde(default)]
    pub start: f64,
    /// Fraction of the steps at which it stops, in (start, 1] (default 1.0).
    #[serde(default = "default_one")]
    pub end: f64,
}

/// Colour temperature and tint, applied in linear light after decoding, then an optional LUT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tone {
    /// Target white point in kelvin, 1000–40000; below 6500 warms, above cools (default 6500).
    #[serde(default = "default_temperature")]
    pub temperature_k: f64,
    /// Green (−) / magenta (+) shift, −1 to 1 (default 0).
    #[serde(default)]
    pub tint: f64,
    /// Blend of the toned image over the untoned one, 0–1 (default 1).
    #[serde(default = "default_one")]
    pub strength: f64,
    /// A `.cube` LUT file name resolved under the configured LUT directory (default none).
    #[serde(default)]
    pub lut: Option<String>,
}

fn default_temperature() -> f64 {
    6500.0
}

impl Preset {
    /// Parses and validates a preset whose file stem is `stem`: the `name` field must equal it.
    pub fn from_toml(stem: &str, text: &str) -> Result<Preset, PresetError> {
        let preset: Preset = toml::from_str(text).map_err(|error| PresetError::Parse {
            name: stem.to_owned(),
            message: error.message().to_owned(),
        })?;
        if preset.name != stem {
            return Err(PresetError::Invalid {
                name: stem.to_owned(),
                field: "name".to_owned(),
                message: format!("{:?} does not match the file name {stem:?}", preset.name),
            });
        }
        preset.validate()?;
        Ok(preset)
    }

    /// Checks every range and name; the error names the first offending field.
    pub fn validate(&self) -> Result<(), PresetError> {
        let invalid = |field: &str, message: String| PresetError::Invalid {
            name: self.name.clone(),
            field: field.to_owned(),
            message,
        };
        if !is_plain_name(&self.name) {
            return Err(invalid("name", "must be a plain, non-empty name".into()));
        }
        check_placeholders(&self.prompt).map_err(|m| invalid("prompt", m))?;
        if !(1..=150).contains(&self.steps) {
            return Err(invalid("steps", format!("{} is not in 1–150", self.steps)));
        }
        check_range(self.guidance, 0.0, 30.0).map_err(|m| invalid("guidance", m))?;
        if !SCHEDULERS.contains(&self.scheduler.as_str()) {
            return Err(invalid(
                "scheduler",
                format!(
                    "{:?} is not one of {}",
                    self.scheduler,
                    SCHEDULERS.join(", ")
                ),
            ));
        }
        if let Some(strength) = self.strength
            && !(strength > 0.0 && strength <= 1.0)
        {
            return Err(invalid("strength", format!("{strength} is not in (0, 1]")));
        }
        if let Resolution::Fixed { width, height } = self.resolution {
            for (field, value) in [("resolution.width", width), ("resolution.height", height)] {
                if !(256..=4096).contains(&value) || value % 8 != 0 {
                    return Err(invalid(
                        field,
                        format!("{value} is not a multiple of 8 in 256–4096"),
                    ));
                }
            }
        }
        if let Some(face) = &self.face
            && !(face.head_ratio > 0.0 && face.head_ratio < 1.0)
        {
            return Err(invalid(
                "face.head_ratio",
                format!("{} is not in (0, 1)", face.head_ratio),
            ));
        }
        for (i, lora) in self.loras.iter().enumerate() {
            if !is_plain_name(&lora.name) {
                return Err(invalid(
                    &format!("loras[{i}].name"),
                    format!("{:?} must be a plain file name", lora.name),
                ));
            }
            if !lora.weight.is_finite() {
                return Err(invalid(
                    &format!("loras[{i}].weight"),
                    format!("{} is not finite", lora.weight),
                ));
            }
        }
        for (i, control) in self.controlnets.iter().enumerate() {
            if !is_plain_name(&control.model) {
                return Err(invalid(
                    &format!("controlnets[{i}].model"),
                    format!("{:?} must be a plain folder name", control.model),
                ));
            }
            if !(control.scale.is_finite() && control.scale >= 0.0) {
                return Err(invalid(
                    &format!("controlnets[{i}].scale"),
                    format!("{} is not a finite number ≥ 0", control.scale),
                ));
            }
            if !(0.0 <= control.start && control.start < control.end && control.end <= 1.0) {
                return Err(invalid(
                    &format!("controlnets[{i}].start"),
                    format!(
                        "start {} and end {} do not satisfy 0 ≤ start < end ≤ 1",
                        control.start, control.end
                    ),
                ));
            }
        }
        if let Some(tone) = &self.tone {
            check_range(tone.temperature_k, 1000.0, 40000.0)
                .map_err(|m| invalid("tone.temperature_k", m))?;
            check_range(tone.tint, -1.0, 1.0).map_err(|m| invalid("tone.tint", m))?;
            check_range(tone.strength, 0.0, 1.0).map_err(|m| invalid("tone.strength", m))?;
            if let Some(lut) = &tone.lut
                && (!is_plain_name(lut) || !lut.ends_with(".cube"))
            {
                return Err(invalid(
                    "tone.lut",
                    format!("{lut:?} must be a plain `.cube` file name"),
                ));
            }
        }
        Ok(())
    }

    /// The prompt with `{subject}` replaced by `subject`.
    pub fn render_prompt(&self, subject: &str) -> String {
        self.prompt.replace(SUBJECT_PLACEHOLDER, subject)
    }

    /// The ControlNet kinds preprocess must draw maps for, in order, without repeats.
    pub fn control_kinds(&self) -> Vec<ControlKind> {
        let mut kinds = Vec::new();
        for control in &self.controlnets {
            if !kinds.contains(&control.kind) {
                kinds.push(control.kind);
            }
        }
        kinds
    }
}

fn check_range(value: f64, low: f64, high: f64) -> Result<(), String> {
    if value.is_finite() && (low..=high).contains(&value) {
        Ok(())
    } else {
        Err(format!("{value} is not in {low}–{high}"))
    }
}

/// A name that stays inside the directory it is resolved under.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && !name.starts_with('.')
}

/// Only `{subject}` may appear between braces.
fn check_placeholders(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open..];
        let Some(close) = after.find('}') else {
            return Err("an unclosed `{`".into());
        };
        let placeholder = &after[..=close];
        if placeholder != SUBJECT_PLACEHOLDER {
            return Err(format!(
                "unknown placeholder {placeholder:?} (only {SUBJECT_PLACEHOLDER} is replaced)"
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// Presets by name: the built-ins, overridden by an operator's directory.
#[derive(Debug, Clone)]
pub struct PresetLibrary {
    presets: BTreeMap<String, Preset>,
}

impl PresetLibrary {
    /// The presets shipped in `shared/presets/` (tests check each parses and validates).
    pub fn builtin() -> Result<PresetLibrary, PresetError> {
        let mut presets = BTreeMap::new();
        for (stem, text) in BUILTIN {
            presets.insert(stem.to_owned(), Preset::from_toml(stem, text)?);
        }
        Ok(PresetLibrary { presets })
    }

    /// Adds every `*.toml` preset in `dir`, replacing built-ins of the same name. Each file's
    /// stem must equal its `name`; any invalid file is an error (nothing is skipped silently).
    pub fn with_dir(mut self, dir: impl AsRef<Path>) -> Result<PresetLibrary, PresetError> {
        let dir = dir.as_ref();
        let io = |path: &Path, error: std::io::Error| PresetError::Io {
            path: path.to_owned(),
            message: error.to_string(),
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
            let path = entry.map_err(|e| io(dir, e))?.path();
            if path.extension().is_some_and(|ext| ext == "toml") && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        for path in files {
            let stem = path
                .file_stem()
                .and_then(|stem| stem.to_str())
                .ok_or_else(|| PresetError::Io {
                    path: path.clone(),
                    message: "file name is not UTF-8".into(),
                })?
                .to_owned();
            let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
            let preset = Preset::from_toml(&stem, &text)?;
            self.presets.insert(stem, preset);
        }
        Ok(self)
    }

    /// The preset called `name`, or [`PresetError::Unknown`] listing every known name.
    pub fn get(&self, name: &str) -> Result<&Preset, PresetError> {
        self.presets.get(name).ok_or_else(|| PresetError::Unknown {
            name: name.to_owned(),
            known: self.names().map(str::to_owned).collect(),
        })
    }

    /// Every preset name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.presets.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_placeholders() {
        assert!(check_placeholders("a portrait of {subject}, studio light").is_ok());
        assert!(check_placeholders("no placeholder").is_ok());
        assert!(check_placeholders("{subjet}").is_err());
        assert!(check_placeholders("open {subject").is_err());
    }

    #[test]
    fn plain_names() {
        assert!(is_plain_name("storybook-style.safetensors"));
        for bad in ["", ".", "..", "../x", "a/b", "a\\b", ".hidden"] {
            assert!(!is_plain_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn resolution_round_trips() {
        for resolution in [
            Resolution::Bucket,
            Resolution::Fixed {
                width: 1024,
                height: 768,
            },
        ] {
            let text = toml::to_string(&Preset {
                resolution,
                ..minimal()
            })
            .expect("serialises");
            assert_eq!(
                Preset::from_toml("minimal", &text),
                Ok(Preset {
                    resolution,
                    ..minimal()
                })
            );
        }
    }

    fn minimal() -> Preset {
        Preset::from_toml("minimal", "name = \"minimal\"\nprompt = \"x\"\n").expect("parses")
    }

    #[test]
    fn defaults() {
        let preset = minimal();
        assert_eq!(preset.steps, 30);
        assert_eq!(preset.guidance, 5.0);
        assert_eq!(preset.scheduler, "dpmpp-2m-karras");
        assert_eq!(preset.strength, None);
        assert_eq!(preset.resolution, Resolution::Bucket);
        assert!(preset.face.is_none() && preset.tone.is_none());
        assert!(preset.loras.is_empty() && preset.controlnets.is_empty());
    }
}
