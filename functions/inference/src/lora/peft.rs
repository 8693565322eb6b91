//! The key formats diffusers writes and reads (`diffusers/loaders/lora_pipeline.py`,
//! `utils/state_dict_utils.py`): a component prefix (`unet.`, `text_encoder.`,
//! `text_encoder_2.`; none, or peft's `base_model.model.`, for a bare UNet adapter), the module's
//! path, and the factor:
//!
//! | spelling | down | up |
//! |---|---|---|
//! | PEFT (diffusers ≥ 0.24) | `<module>.lora_A.weight` | `<module>.lora_B.weight` |
//! | `LoRACompatibleLinear` | `<module>.lora.down.weight` | `<module>.lora.up.weight` |
//! | text encoders, diffusers 0.2x | `<module>.lora_linear_layer.down.weight` | `….up.weight` |
//! | attention processors | `<attn>.processor.to_q_lora.down.weight` | `….up.weight` |
//!
//! Attention-processor names map as diffusers maps them: `to_q_lora` → `to_q`, `to_out_lora` →
//! `to_out.0` in the UNet; `to_q_lora` → `q_proj`, `to_out_lora` → `out_proj` in the text
//! encoders; `.processor.` is dropped everywhere.
//!
//! The scale of a PEFT LoRA is `lora_alpha / r` (peft's `LoraLayer.update_layer`; with
//! `use_rslora`, `lora_alpha / √r`), with `lora_alpha` and `alpha_pattern` from the
//! `lora_adapter_metadata` header `save_lora_weights` writes (a JSON object whose keys carry the
//! component prefix: `unet.lora_alpha`, …). Without metadata the alpha is the rank: scale 1, as
//! diffusers' `get_peft_kwargs` derives it. A per-module `<module>.alpha` tensor, which some
//! converters write, is honoured as kohya's alpha. peft matches `alpha_pattern` keys as regular
//! expressions anchored at a module-path boundary; they are matched here literally (a module
//! equal to the key or ending in `.key`), which is how diffusers writes them.

use std::collections::HashMap;

use serde_json::Value;

use super::{Factor, ModuleName, ParsedKey};
use crate::loader::Component;

/// The header entry diffusers writes the adapter configs to (`LORA_ADAPTER_METADATA_KEY`).
pub const METADATA_KEY: &str = "lora_adapter_metadata";

const COMPONENTS: [(&str, Component); 3] = [
    ("unet.", Component::Unet),
    ("text_encoder.", Component::TextEncoder),
    ("text_encoder_2.", Component::TextEncoder2),
];

const FACTORS: [(&str, Factor); 7] = [
    (".lora_A.weight", Factor::Down),
    (".lora_B.weight", Factor::Up),
    (".lora.down.weight", Factor::Down),
    (".lora.up.weight", Factor::Up),
    (".lora_linear_layer.down.weight", Factor::Down),
    (".lora_linear_layer.up.weight", Factor::Up),
    (".alpha", Factor::Alpha),
];

const UNSUPPORTED: [(&str, &str); 5] = [
    (".lora_B.bias", "a LoRA bias (lora_bias)"),
    (".lora_magnitude_vector", "DoRA"),
    (".lora_magnitude_vector.weight", "DoRA"),
    (".lora_embedding_A", "an embedding LoRA"),
    (".lora_embedding_B", "an embedding LoRA"),
];

/// What a diffusers/PEFT key is.
pub fn parse(key: &str) -> ParsedKey {
    let (component, rest) = COMPONENTS
        .iter()
        .find_map(|(prefix, component)| Some((*component, key.strip_prefix(prefix)?)))
        .unwrap_or((
            Component::Unet,
            key.strip_prefix("base_model.model.").unwrap_or(key),
        ));
    if let Some((_, kind)) = UNSUPPORTED
        .iter()
        .find(|(suffix, _)| rest.ends_with(suffix))
    {
        return ParsedKey::Unsupported(kind);
    }
    let rest = rest.replace(".processor.", ".");
    let (module, factor) = match FACTORS
        .iter()
        .find_map(|(suffix, factor)| Some((rest.strip_suffix(suffix)?.to_owned(), *factor)))
    {
        Some(found) => found,
        None => match processor_style(component, &rest) {
            Some(found) => found,
            None => return ParsedKey::Unknown,
        },
    };
    if module.is_empty() {
        return ParsedKey::Unknown;
    }
    ParsedKey::Entry {
        component,
        module: ModuleName::Dotted(module),
        factor,
    }
}

/// `<attn>.to_q_lora.down.weight` (`.processor.` already removed) as the projection it adapts.
fn processor_style(component: Component, rest: &str) -> Option<(String, Factor)> {
    let (stem, factor) = [
        ("_lora.down.weight", Factor::Down),
        ("_lora.up.weight", Factor::Up),
    ]
    .iter()
    .find_map(|(suffix, factor)| Some((rest.strip_suffix(suffix)?, *factor)))?;
    let (attention, projection) = stem.rsplit_once('.')?;
    let projection = match (component, projection) {
        (Component::Unet, "to_q" | "to_k" | "to_v") => projection,
        (Component::Unet, "to_out") => "to_out.0",
        (_, "to_q") => "q_proj",
        (_, "to_k") => "k_proj",
        (_, "to_v") => "v_proj",
        (_, "to_out") => "out_proj",
        _ => return None,
    };
    Some((format!("{attention}.{projection}"), factor))
}

/// The adapter config of one component, as far as the scale depends on it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdapterConfig {
    /// `lora_alpha`.
    pub lora_alpha: Option<f64>,
    /// `alpha_pattern`: module-name key → alpha.
    pub alpha_pattern: Vec<(String, f64)>,
    /// `use_rslora`: scale `alpha / √r`.
    pub use_rslora: bool,
    /// `use_dora`: refused.
    pub use_dora: bool,
}

impl AdapterConfig {
    /// The alpha of `module` (its path as the file names it, without the component prefix).
    pub fn alpha_for(&self, module: &str) -> Option<f64> {
        self.alpha_pattern
            .iter()
            .find(|(pattern, _)| {
                module == pattern
                    || module
                        .strip_suffix(pattern.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            })
            .map(|(_, alpha)| *alpha)
            .or(self.lora_alpha)
    }
}

/// The adapter configs of a file's `lora_adapter_metadata`, per component.
#[derive(Debug, Clone, Default)]
pub struct AdapterConfigs {
    configs: HashMap<Component, AdapterConfig>,
}

impl AdapterConfigs {
    /// Reads the configs from a safetensors header's metadata (none: no configs).
    pub fn from_metadata(metadata: Option<&HashMap<String, String>>) -> Result<Self, String> {
        let Some(raw) = metadata.and_then(|m| m.get(METADATA_KEY)) else {
            return Ok(Self::default());
        };
        let value: Value = serde_json::from_str(raw).map_err(|e| e.to_string())?;
        let Value::Object(entries) = value else {
            return Err("not a JSON object".to_owned());
        };
        let mut configs: HashMap<Component, AdapterConfig> = HashMap::new();
        for (key, value) in &entries {
            let Some((prefix, field)) = key.split_once('.') else {
                continue;
            };
            let Some(component) = COMPONENTS
                .iter()
                .find(|(p, _)| p.strip_suffix('.') == Some(prefix))
                .map(|(_, c)| *c)
            else {
                continue;
            };
            let config = configs.entry(component).or_default();
            let number = |value: &Value| {
                value
                    .as_f64()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| format!("{key} is not a finite number"))
            };
            match field {
                "lora_alpha" => config.lora_alpha = Some(number(value)?),
                "alpha_pattern" => {
                    let Value::Object(patterns) = value else {
                        if value.is_null() {
                            continue;
                        }
                        return Err(format!("{key} is not an object"));
                    };
                    config.alpha_pattern = patterns
                        .iter()
                        .map(|(pattern, alpha)| Ok((pattern.clone(), number(alpha)?)))
                        .collect::<Result<_, String>>()?;
                    // The most specific (longest) pattern first.
                    config
                        .alpha_pattern
                        .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
                }
                "use_rslora" => config.use_rslora = value.as_bool().unwrap_or(false),
                "use_dora" => config.use_dora = value.as_bool().unwrap_or(false),
                _ => {}
            }
        }
        Ok(AdapterConfigs { configs })
    }

    /// The config of `component`, if the metadata has one.
    pub fn get(&self, component: Component) -> Option<&AdapterConfig> {
        self.configs.get(&component)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn entry(component: Component, module: &str, factor: Factor) -> ParsedKey {
        ParsedKey::Entry {
            component,
            module: ModuleName::Dotted(module.to_owned()),
            factor,
        }
    }

    #[test]
    fn diffusers_spellings() {
        let attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn1";
        let cases = [
            (
                format!("unet.{attn}.to_q.lora_A.weight"),
                entry(Component::Unet, &format!("{attn}.to_q"), Factor::Down),
            ),
            (
                format!("unet.{attn}.to_out.0.lora.up.weight"),
                entry(Component::Unet, &format!("{attn}.to_out.0"), Factor::Up),
            ),
            (
                format!("unet.{attn}.processor.to_out_lora.down.weight"),
                entry(Component::Unet, &format!("{attn}.to_out.0"), Factor::Down),
            ),
            (
                format!("{attn}.processor.to_k_lora.up.weight"),
                entry(Component::Unet, &format!("{attn}.to_k"), Factor::Up),
            ),
            (
                format!("base_model.model.{attn}.to_v.lora_B.weight"),
                entry(Component::Unet, &format!("{attn}.to_v"), Factor::Up),
            ),
            (
                "text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.up.weight"
                    .to_owned(),
                entry(
                    Component::TextEncoder,
                    "text_model.encoder.layers.0.self_attn.out_proj",
                    Factor::Up,
                ),
            ),
            (
                "text_encoder_2.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.down.weight"
                    .to_owned(),
                entry(
                    Component::TextEncoder2,
                    "text_model.encoder.layers.1.mlp.fc1",
                    Factor::Down,
                ),
            ),
            (
                "text_encoder.encoder.layers.0.self_attn.q_proj.alpha".to_owned(),
                entry(
                    Component::TextEncoder,
                    "encoder.layers.0.self_attn.q_proj",
                    Factor::Alpha,
                ),
            ),
        ];
        for (key, expected) in cases {
            assert_eq!(parse(&key), expected, "{key}");
        }
        assert_eq!(
            parse("unet.a.to_q.lora_magnitude_vector"),
            ParsedKey::Unsupported("DoRA")
        );
        assert_eq!(
            parse("unet.a.to_q.lora_B.bias"),
            ParsedKey::Unsupported("a LoRA bias (lora_bias)")
        );
        assert_eq!(parse("unet.a.to_q.weight"), ParsedKey::Unknown);
        assert_eq!(parse("unet.a.proj_lora.down.weight"), ParsedKey::Unknown);
        assert_eq!(parse(".lora_A.weight"), ParsedKey::Unknown);
    }

    #[test]
    fn adapter_metadata() {
        let json = serde_json::json!({
            "unet.r": 4,
            "unet.lora_alpha": 8,
            "unet.alpha_pattern": {"attn1.to_q": 2, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 3},
            "text_encoder_2.lora_alpha": 6.0,
            "text_encoder_2.use_rslora": true,
            "text_encoder.alpha_pattern": null,
        });
        let metadata = HashMap::from([(METADATA_KEY.to_owned(), json.to_string())]);
        let configs = AdapterConfigs::from_metadata(Some(&metadata)).unwrap();
        let unet = configs.get(Component::Unet).unwrap();
        assert_eq!(
            unet.alpha_for("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
            Some(3.0)
        );
        assert_eq!(
            unet.alpha_for("up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
            Some(2.0)
        );
        assert_eq!(
            unet.alpha_for("up_blocks.0.attentions.0.transformer_blocks.0.xattn1.to_q"),
            Some(8.0)
        );
        let te2 = configs.get(Component::TextEncoder2).unwrap();
        assert!(te2.use_rslora);
        assert_eq!(te2.alpha_for("x"), Some(6.0));
        assert_eq!(
            configs.get(Component::TextEncoder).unwrap().lora_alpha,
            None
        );
        assert!(
            AdapterConfigs::from_metadata(None)
                .unwrap()
                .get(Component::Unet)
                .is_none()
        );
        let bad = HashMap::from([(METADATA_KEY.to_owned(), "[1]".to_owned())]);
        assert!(AdapterConfigs::from_metadata(Some(&bad)).is_err());
        let bad = HashMap::from([(
            METADATA_KEY.to_owned(),
            r#"{"unet.lora_alpha": "eight"}"#.to_owned(),
        )]);
        assert!(AdapterConfigs::from_metadata(Some(&bad)).is_err());
    }
}
