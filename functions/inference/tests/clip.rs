//! SDXL's text side against transformers 5.23 / diffusers 0.42 on tiny random CLIP text encoders
//! and the real CLIP vocabulary (fixture: `reference/clip.py`). Token ids must be equal; hidden
//! states and embeddings agree to a relative error of 1e-4 (f32, CPU).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use darkroom_inference::clip::{
    Activation, ClipTextConfig, ClipTextModel, ClipTextModelWithProjection,
    canonical_parameter_name,
};
use darkroom_inference::text_encoder::{PromptRequest, SdxlTextEncoders};
use darkroom_inference::tokenizer::{ClipTokenizer, MAX_LENGTH};
use serde_json::Value;
use tch::{Device, Tensor, nn};

const TOLERANCE: f64 = 1e-4;

fn fixture() -> PathBuf {
    common::fixture("clip", &[])
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn text_encoder(dir: &Path) -> ClipTextModel {
    let config = ClipTextConfig::from_file(&dir.join("text_encoder/config.json")).unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = ClipTextModel::new(vs.root(), &config).unwrap();
    vs.load(dir.join("text_encoder/model.safetensors")).unwrap();
    model
}

fn text_encoder_2(dir: &Path) -> ClipTextModelWithProjection {
    let config = ClipTextConfig::from_file(&dir.join("text_encoder_2/config.json")).unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = ClipTextModelWithProjection::new(vs.root(), &config).unwrap();
    vs.load(dir.join("text_encoder_2/model.safetensors"))
        .unwrap();
    model
}

fn assert_close(name: &str, actual: &Tensor, expected: &Tensor) -> f64 {
    let error = common::relative_error(actual, expected);
    assert!(error <= TOLERANCE, "{name}: relative error {error:e}");
    error
}

fn ids(value: &Value) -> Vec<i64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

#[test]
fn token_ids_equal_transformers() {
    let dir = fixture();
    let tokens = json(&dir.join("tokens.json"));
    let tokenizers = [
        (
            "tokenizer",
            ClipTokenizer::from_folder(&dir.join("tokenizer")).unwrap(),
        ),
        (
            "tokenizer",
            ClipTokenizer::bundled_sdxl_tokenizer().unwrap(),
        ),
        (
            "tokenizer_2",
            ClipTokenizer::from_folder(&dir.join("tokenizer_2")).unwrap(),
        ),
        (
            "tokenizer_2",
            ClipTokenizer::bundled_sdxl_tokenizer_2().unwrap(),
        ),
    ];
    for (key, tokenizer) in &tokenizers {
        assert_eq!(tokenizer.max_length(), MAX_LENGTH);
        for (i, prompt) in tokens["prompts"].as_array().unwrap().iter().enumerate() {
            let prompt = prompt.as_str().unwrap();
            let encoded = tokenizer.encode(prompt).unwrap();
            assert_eq!(encoded.ids, ids(&tokens[*key][i]), "{key} on {prompt:?}");
            let untruncated = tokens[format!("untruncated_{key}")][i]
                .as_array()
                .unwrap()
                .len();
            assert_eq!(
                encoded.truncated,
                untruncated.saturating_sub(MAX_LENGTH),
                "{key} on {prompt:?}"
            );
        }
    }
    let [_, (_, bundled), _, (_, bundled_2)] = &tokenizers;
    assert_eq!(bundled.pad_token_id(), 49407);
    assert_eq!(bundled_2.pad_token_id(), 0);
    assert_eq!(
        (bundled.bos_token_id(), bundled.eos_token_id()),
        (49406, 49407)
    );
}

#[test]
fn bundled_vocabulary_equals_the_folder_vocabulary() {
    let dir = fixture();
    let vocab = json(&dir.join("tokenizer/vocab.json"));
    let vocab = vocab.as_object().unwrap();
    assert_eq!(vocab.len(), 49408);
    for tokenizer in [
        ClipTokenizer::bundled_sdxl_tokenizer().unwrap(),
        ClipTokenizer::bundled_sdxl_tokenizer_2().unwrap(),
    ] {
        for (token, id) in vocab {
            assert_eq!(
                tokenizer.token_to_id(token),
                Some(id.as_u64().unwrap() as u32),
                "{token}"
            );
        }
    }
}

#[test]
fn text_encoder_matches_clip_text_model() {
    let dir = fixture();
    let reference = common::read_tensors(&dir.join("encoders.safetensors"));
    let model = text_encoder(&dir);
    assert_eq!(model.config().hidden_act, Activation::QuickGelu);
    assert_eq!(model.config().eos_token_id, 49407);
    let mut worst: f64 = 0.0;
    tch::no_grad(|| {
        for row in ["prompt1", "prompt3", "prompt9", "prompt0", "raw"] {
            let key = |name: &str| format!("te1.{row}.{name}");
            let output = model.forward(&reference[&key("input_ids")]);
            assert_eq!(output.hidden_states.len(), 4);
            for (i, hidden) in output.hidden_states.iter().enumerate() {
                let name = key(&format!("hidden_states.{i}"));
                worst = worst.max(assert_close(&name, hidden, &reference[&name]));
            }
            for (name, tensor) in [
                ("last_hidden_state", &output.last_hidden_state),
                ("pooler_output", &output.pooler_output),
            ] {
                worst = worst.max(assert_close(&key(name), tensor, &reference[&key(name)]));
            }
        }
    });
    println!("text_encoder: max relative error {worst:e}");
}

#[test]
fn text_encoder_2_matches_clip_text_model_with_projection() {
    let dir = fixture();
    let reference = common::read_tensors(&dir.join("encoders.safetensors"));
    let model = text_encoder_2(&dir);
    assert_eq!(model.config().hidden_act, Activation::Gelu);
    assert_eq!(model.config().eos_token_id, 2);
    let mut worst: f64 = 0.0;
    tch::no_grad(|| {
        for row in ["prompt1", "prompt3", "prompt9", "prompt0", "raw"] {
            let key = |name: &str| format!("te2.{row}.{name}");
            let output = model.forward(&reference[&key("input_ids")]);
            assert_eq!(output.text.hidden_states.len(), 6);
            for (i, hidden) in output.text.hidden_states.iter().enumerate() {
                let name = key(&format!("hidden_states.{i}"));
                worst = worst.max(assert_close(&name, hidden, &reference[&name]));
            }
            for (name, tensor) in [
                ("last_hidden_state", &output.text.last_hidden_state),
                ("pooler_output", &output.text.pooler_output),
                ("text_embeds", &output.text_embeds),
            ] {
                worst = worst.max(assert_close(&key(name), tensor, &reference[&key(name)]));
            }
        }
    });
    println!("text_encoder_2: max relative error {worst:e}");
}

#[test]
fn transformers_5_unprefixed_weights_load_through_canonical_names() {
    let dir = fixture();
    let reference = common::read_tensors(&dir.join("encoders.safetensors"));
    let config = ClipTextConfig::from_file(&dir.join("text_encoder/config.json")).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = ClipTextModel::new(vs.root(), &config).unwrap();
    let file = common::read_tensors(&dir.join("text_encoder/model_v5_layout.safetensors"));
    let mut variables = vs.variables();
    tch::no_grad(|| {
        for (name, tensor) in &file {
            let mut variable = variables
                .remove(canonical_parameter_name(name).as_ref())
                .unwrap();
            variable.copy_(tensor);
        }
    });
    assert!(variables.is_empty(), "not loaded: {:?}", variables.keys());
    let output = tch::no_grad(|| model.forward(&reference["te1.prompt1.input_ids"]));
    assert_close(
        "v5 layout",
        &output.last_hidden_state,
        &reference["te1.prompt1.last_hidden_state"],
    );
}

#[test]
fn encode_prompt_matches_diffusers() {
    let dir = fixture();
    let reference = common::read_tensors(&dir.join("encode_prompt.safetensors"));
    let mut encoders = SdxlTextEncoders {
        tokenizer: ClipTokenizer::from_folder(&dir.join("tokenizer")).unwrap(),
        text_encoder: text_encoder(&dir),
        tokenizer_2: ClipTokenizer::from_folder(&dir.join("tokenizer_2")).unwrap(),
        text_encoder_2: text_encoder_2(&dir),
        force_zeros_for_empty_prompt: true,
    };
    let text = |case: &Value, key: &str| case.get(key).and_then(Value::as_str).map(str::to_owned);
    let mut worst: HashMap<&str, f64> = HashMap::new();
    for case in json(&dir.join("encode_prompt.json")).as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        encoders.force_zeros_for_empty_prompt =
            case["force_zeros_for_empty_prompt"].as_bool().unwrap();
        let request = PromptRequest {
            prompt: text(case, "prompt").unwrap(),
            prompt_2: text(case, "prompt_2"),
            negative_prompt: text(case, "negative_prompt"),
            negative_prompt_2: text(case, "negative_prompt_2"),
            classifier_free_guidance: case
                .get("do_classifier_free_guidance")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            clip_skip: case
                .get("clip_skip")
                .and_then(Value::as_u64)
                .map(|n| n as usize),
        };
        let conditioning = encoders.encode_prompt(&request).unwrap();
        let key = |what: &str| format!("{name}.{what}");
        assert_eq!(
            conditioning.prompt_embeds.size(),
            [1, 77, 32 + 64],
            "{name}"
        );
        assert_eq!(conditioning.pooled_prompt_embeds.size(), [1, 48], "{name}");
        let mut check =
            |what: &'static str, actual: Option<&Tensor>| match (actual, reference.get(&key(what)))
            {
                (Some(actual), Some(expected)) => {
                    let error = assert_close(&key(what), actual, expected);
                    let entry = worst.entry(what).or_default();
                    *entry = entry.max(error);
                }
                (None, None) => {}
                (actual, expected) => panic!(
                    "{name}.{what}: present here {}, in diffusers {}",
                    actual.is_some(),
                    expected.is_some()
                ),
            };
        check("prompt_embeds", Some(&conditioning.prompt_embeds));
        check(
            "pooled_prompt_embeds",
            Some(&conditioning.pooled_prompt_embeds),
        );
        check(
            "negative_prompt_embeds",
            conditioning.negative_prompt_embeds.as_ref(),
        );
        check(
            "negative_pooled_prompt_embeds",
            conditioning.negative_pooled_prompt_embeds.as_ref(),
        );
        let zeros = name == "no_negative";
        if let Some(negative) = &conditioning.negative_prompt_embeds {
            assert_eq!(
                negative.abs().max().double_value(&[]) == 0.0,
                zeros,
                "{name}"
            );
        }
        let truncated = if name == "long_prompt_2_empty_negative" {
            134 - 77
        } else {
            0
        };
        assert_eq!(conditioning.truncated_tokens, truncated, "{name}");
    }
    println!("encode_prompt: max relative errors {worst:?}");
}

#[test]
fn clip_skip_past_the_first_layer_is_an_error() {
    let dir = fixture();
    let encoders = SdxlTextEncoders {
        tokenizer: ClipTokenizer::bundled_sdxl_tokenizer().unwrap(),
        text_encoder: text_encoder(&dir),
        tokenizer_2: ClipTokenizer::bundled_sdxl_tokenizer_2().unwrap(),
        text_encoder_2: text_encoder_2(&dir),
        force_zeros_for_empty_prompt: true,
    };
    // text_encoder has 3 layers: hidden_states[-(clip_skip + 2)] exists for clip_skip ≤ 2.
    let request = |clip_skip| PromptRequest {
        clip_skip: Some(clip_skip),
        ..PromptRequest::new("a cat")
    };
    assert!(encoders.encode_prompt(&request(2)).is_ok());
    assert!(matches!(
        encoders.encode_prompt(&request(3)),
        Err(darkroom_inference::EngineError::InvalidConfig { .. })
    ));
}
