//! The key format of kohya-ss/sd-scripts (`networks/lora.py`), which most LoRAs on civitai use:
//! `<lora name>.<tensor>`, where the LoRA name is a prefix for the model part and the module's
//! path with `.` written as `_`:
//!
//! | prefix | component |
//! |---|---|
//! | `lora_unet_` | UNet (SDXL trainers: the original SGM naming `input_blocks_4_1_…`; some tools: diffusers' `down_blocks_1_attentions_0_…`) |
//! | `lora_te1_` | first text encoder (CLIP ViT-L, `text_model_encoder_layers_0_…`) |
//! | `lora_te2_` | second text encoder (OpenCLIP bigG in transformers' naming) |
//! | `lora_te_` | SD 1.x/2.x's only text encoder; taken as the first, as diffusers does |
//!
//! and the tensor is `lora_down.weight`, `lora_up.weight` or `alpha`. Since `_` also occurs
//! inside module names, the flattened name is looked up among the flattened names of the model's
//! modules ([`super::LoraTarget`]) rather than split.
//!
//! LyCORIS variants stored under the same prefixes (LoHa `hada_*`, LoKr `lokr_*`, LoCon's
//! CP-decomposed `lora_mid`, DoRA's `dora_scale`, full `diff` weights) are recognised and refused.

use super::{Factor, ModuleName, ParsedKey};
use crate::loader::Component;

const PREFIXES: [(&str, Component); 4] = [
    ("lora_unet_", Component::Unet),
    ("lora_te1_", Component::TextEncoder),
    ("lora_te2_", Component::TextEncoder2),
    ("lora_te_", Component::TextEncoder),
];

/// What a kohya key is, or `None` when `key` does not use kohya's prefixes.
pub fn parse(key: &str) -> Option<ParsedKey> {
    let (component, rest) = PREFIXES
        .iter()
        .find_map(|(prefix, component)| Some((*component, key.strip_prefix(prefix)?)))?;
    let Some((module, tensor)) = rest.split_once('.') else {
        return Some(ParsedKey::Unknown);
    };
    let factor = match tensor {
        "lora_down.weight" => Factor::Down,
        "lora_up.weight" => Factor::Up,
        "alpha" => Factor::Alpha,
        "dora_scale" => return Some(ParsedKey::Unsupported("DoRA")),
        "lora_mid.weight" => {
            return Some(ParsedKey::Unsupported(
                "LoCon with lora_mid (CP decomposition)",
            ));
        }
        t if t.starts_with("hada_") => return Some(ParsedKey::Unsupported("LoHa")),
        t if t.starts_with("lokr_") => return Some(ParsedKey::Unsupported("LoKr")),
        "diff" | "diff_b" => return Some(ParsedKey::Unsupported("a full weight difference")),
        _ => return Some(ParsedKey::Unknown),
    };
    if module.is_empty() {
        return Some(ParsedKey::Unknown);
    }
    Some(ParsedKey::Entry {
        component,
        module: ModuleName::Flat(module.to_owned()),
        factor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(component: Component, module: &str, factor: Factor) -> Option<ParsedKey> {
        Some(ParsedKey::Entry {
            component,
            module: ModuleName::Flat(module.to_owned()),
            factor,
        })
    }

    #[test]
    fn kohya_keys() {
        assert_eq!(
            parse("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"),
            entry(
                Component::Unet,
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                Factor::Down
            )
        );
        assert_eq!(
            parse("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"),
            entry(
                Component::TextEncoder2,
                "text_model_encoder_layers_0_mlp_fc1",
                Factor::Alpha
            )
        );
        assert_eq!(
            parse("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"),
            entry(
                Component::TextEncoder,
                "text_model_encoder_layers_0_mlp_fc1",
                Factor::Up
            )
        );
        assert_eq!(
            parse("lora_unet_x.hada_w1_a"),
            Some(ParsedKey::Unsupported("LoHa"))
        );
        assert_eq!(
            parse("lora_unet_x.dora_scale"),
            Some(ParsedKey::Unsupported("DoRA"))
        );
        assert_eq!(parse("lora_unet_x.something"), Some(ParsedKey::Unknown));
        assert_eq!(parse("lora_unet_x"), Some(ParsedKey::Unknown));
        assert_eq!(parse("unet.x.lora_A.weight"), None);
    }
}
