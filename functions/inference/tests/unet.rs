//! SDXL's UNet against diffusers' `UNet2DConditionModel` on small random checkpoints written by
//! `reference/unet.py` (CPU, f32). Tolerance: max |rust − diffusers| / max |diffusers| ≤ 1e-4.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use darkroom_inference::EngineError;
use darkroom_inference::loader::{Component, KeyMap, load_var_store};
use darkroom_inference::unet::{
    AddedConditioning, ControlResiduals, PerBlock, Timestep, UNet2DConditionModel, UNetConfig,
};
use tch::{Device, Kind, Tensor, nn};

const TOLERANCE: f64 = 1e-4;
const MODELS: [&str; 3] = ["sdxl_tiny", "plain", "conv_proj"];
const CASES: [&str; 4] = ["rect", "odd", "control", "odd_control"];

fn model_dir(model: &str) -> PathBuf {
    common::fixture("unet", &[]).join(model)
}

fn load(model: &str) -> (nn::VarStore, UNet2DConditionModel) {
    load_in(model, Kind::Float)
}

/// Builds the UNet with its variables in `kind` and fills them from the (f32) file with the
/// engine's loader, which converts to the variables' kind.
fn load_in(model: &str, kind: Kind) -> (nn::VarStore, UNet2DConditionModel) {
    let dir = model_dir(model).join("unet");
    let json = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config = UNetConfig::from_json(&json).unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    // Before building: the attention's stacked projections are views, which a cast of the
    // store afterwards would pull apart.
    vs.set_kind(kind);
    let unet = UNet2DConditionModel::new(vs.root(), &config).unwrap();
    load_var_store(
        &mut vs,
        &[dir.join("diffusion_pytorch_model.safetensors")],
        &KeyMap::diffusers(Component::Unet),
        Component::Unet,
    )
    .unwrap();
    (vs, unet)
}

fn cases(model: &str) -> HashMap<String, Tensor> {
    common::read_tensors(&model_dir(model).join("cases.safetensors"))
}

/// Runs one recorded case through the Rust UNet.
fn run(unet: &UNet2DConditionModel, t: &HashMap<String, Tensor>, case: &str) -> Tensor {
    let get = |name: &str| t.get(&format!("{case}.{name}"));
    let sample = get("sample").unwrap();
    let context = get("encoder_hidden_states").unwrap();
    let timestep = match (get("timestep"), get("timestep_value")) {
        (Some(tensor), _) => Timestep::Tensor(tensor),
        (None, Some(value)) => Timestep::Value(value.double_value(&[0])),
        (None, None) => panic!("{case}: no timestep"),
    };
    let added = match (get("text_embeds"), get("time_ids")) {
        (Some(text_embeds), Some(time_ids)) => Some(AddedConditioning {
            text_embeds,
            time_ids,
        }),
        _ => None,
    };
    let down: Vec<Tensor> = (0..)
        .map_while(|i| get(&format!("down_residual.{i}")).map(Tensor::shallow_clone))
        .collect();
    let control = get("mid_residual").map(|mid| {
        assert_eq!(down.len(), unet.num_down_residuals());
        ControlResiduals { down: &down, mid }
    });
    unet.forward_with_control(sample, timestep, context, added.as_ref(), control.as_ref())
        .unwrap()
}

/// Each case against diffusers, computing the text's keys and values in the step and, after
/// `remember_context`, from what the cross-attention layers remembered (the same bits).
fn check_model(model: &str) {
    let (_vs, unet) = load(model);
    let t = cases(model);
    for case in CASES {
        let expected = &t[&format!("{case}.out")];
        let actual = run(&unet, &t, case);
        let error = common::relative_error(&actual, expected);
        println!("{model}/{case}: relative error {error:.3e}");
        assert!(
            error <= TOLERANCE,
            "{model}/{case}: relative error {error:e}"
        );
        let context = &t[&format!("{case}.encoder_hidden_states")];
        unet.remember_context(context);
        assert_eq!(run(&unet, &t, case), actual, "{model}/{case} remembered");
        unet.forget_context(context);
    }
}

#[test]
fn sdxl_layout_matches_diffusers() {
    check_model("sdxl_tiny");
}

#[test]
fn unet_without_added_conditioning_matches_diffusers() {
    check_model("plain");
}

#[test]
fn convolution_projections_match_diffusers() {
    check_model("conv_proj");
}

#[test]
fn builds_and_runs_in_bfloat16() {
    // Built in bf16, loaded from the f32 file. Timesteps and time ids may stay f32; the other
    // inputs come in the model's kind. Tolerance: 5e-2, for bf16's 8-bit mantissa.
    let (vs, unet) = load_in("sdxl_tiny", Kind::BFloat16);
    assert!(vs.variables().values().all(|v| v.kind() == Kind::BFloat16));
    let t = cases("sdxl_tiny");
    let half: HashMap<String, Tensor> = t
        .iter()
        .map(|(k, v)| {
            let keep = k.ends_with("timestep") || k.ends_with("time_ids") || k.ends_with(".out");
            let v = if keep {
                v.shallow_clone()
            } else {
                v.to_kind(Kind::BFloat16)
            };
            (k.clone(), v)
        })
        .collect();
    // One case covering everything (odd sizes, residuals): bf16 CPU kernels are slow.
    let actual = run(&unet, &half, "odd_control");
    assert_eq!(actual.kind(), Kind::BFloat16);
    let error = common::relative_error(&actual, &t["odd_control.out"]);
    println!("bf16 odd_control: relative error {error:.3e}");
    assert!(error <= 5e-2, "bf16 odd_control: relative error {error:e}");
}

#[test]
fn residuals_change_the_output() {
    // Guards the control cases against residuals being silently dropped.
    let (_vs, unet) = load("sdxl_tiny");
    let t = cases("sdxl_tiny");
    let with = run(&unet, &t, "control");
    let mut without: HashMap<String, Tensor> = t
        .iter()
        .filter(|(k, _)| !k.contains("residual"))
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    without.retain(|k, _| k.starts_with("control."));
    let plain = run(&unet, &without, "control");
    assert!(common::relative_error(&plain, &with) > 1e-2);
}

#[test]
fn every_input_reaches_the_output() {
    // The parity tolerance means something only if each input moves the output well beyond it.
    let (_vs, unet) = load("sdxl_tiny");
    let t = cases("sdxl_tiny");
    let reference = run(&unet, &t, "rect");
    for (key, change) in [
        ("rect.timestep", 10.0),
        ("rect.time_ids", 64.0),
        ("rect.text_embeds", 0.5),
        ("rect.encoder_hidden_states", 0.5),
    ] {
        let mut changed: HashMap<String, Tensor> = t
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        changed.insert(key.to_owned(), &t[key] + change);
        let moved = common::relative_error(&run(&unet, &changed, "rect"), &reference);
        println!("{key} + {change}: output moves by {moved:.3e}");
        assert!(
            moved > 100.0 * TOLERANCE,
            "{key}: output moved only {moved:e}"
        );
    }
}

#[test]
fn parameters_match_the_checkpoint_exactly() {
    for model in MODELS {
        let (vs, _unet) = load(model);
        let file = common::read_tensors(
            &model_dir(model).join("unet/diffusion_pytorch_model.safetensors"),
        );
        let ours: HashMap<String, Vec<i64>> = vs
            .variables()
            .into_iter()
            .map(|(name, tensor)| (name, tensor.size()))
            .collect();
        let theirs: HashMap<String, Vec<i64>> = file
            .iter()
            .map(|(name, t)| (name.clone(), t.size()))
            .collect();
        let mut missing: Vec<_> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
        let mut extra: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
        missing.sort();
        extra.sort();
        assert!(missing.is_empty(), "{model}: not built: {missing:?}");
        assert!(
            extra.is_empty(),
            "{model}: not in the checkpoint: {extra:?}"
        );
        for (name, shape) in &theirs {
            assert_eq!(&ours[name], shape, "{model}: {name}");
        }
    }
}

/// `unet/config.json` of stabilityai/stable-diffusion-xl-base-1.0, verbatim.
const SDXL_BASE_CONFIG: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "_diffusers_version": "0.19.0.dev0",
  "act_fn": "silu",
  "addition_embed_type": "text_time",
  "addition_embed_type_num_heads": 64,
  "addition_time_embed_dim": 256,
  "attention_head_dim": [5, 10, 20],
  "block_out_channels": [320, 640, 1280],
  "center_input_sample": false,
  "class_embed_type": null,
  "class_embeddings_concat": false,
  "conv_in_kernel": 3,
  "conv_out_kernel": 3,
  "cross_attention_dim": 2048,
  "cross_attention_norm": null,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "downsample_padding": 1,
  "dual_cross_attention": false,
  "encoder_hid_dim": null,
  "encoder_hid_dim_type": null,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_only_cross_attention": null,
  "mid_block_scale_factor": 1,
  "mid_block_type": "UNetMidBlock2DCrossAttn",
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "num_attention_heads": null,
  "num_class_embeds": null,
  "only_cross_attention": false,
  "out_channels": 4,
  "projection_class_embeddings_input_dim": 2816,
  "resnet_out_scale_factor": 1.0,
  "resnet_skip_time_act": false,
  "resnet_time_scale_shift": "default",
  "sample_size": 128,
  "time_cond_proj_dim": null,
  "time_embedding_act_fn": null,
  "time_embedding_dim": null,
  "time_embedding_type": "positional",
  "timestep_post_act": null,
  "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  "upcast_attention": null,
  "use_linear_projection": true
}"#;

#[test]
fn sdxl_base_config_matches_the_published_one() {
    let parsed = UNetConfig::from_json(SDXL_BASE_CONFIG).unwrap();
    assert_eq!(parsed, UNetConfig::sdxl_base());
    // attention_head_dim counts heads: 64 channels per head at every level.
    assert_eq!(parsed.attention_heads().unwrap(), vec![5, 10, 20]);
    assert_eq!(parsed.time_embed_dim(), 1280);
}

fn tiny_config() -> UNetConfig {
    let json = std::fs::read_to_string(model_dir("sdxl_tiny").join("unet/config.json")).unwrap();
    UNetConfig::from_json(&json).unwrap()
}

fn build_error(config: &UNetConfig) -> String {
    let vs = nn::VarStore::new(Device::Cpu);
    match UNet2DConditionModel::new(vs.root(), config) {
        Err(EngineError::InvalidConfig { component, message }) => {
            assert_eq!(component, "unet");
            message
        }
        Err(other) => panic!("expected InvalidConfig, got {other:?}"),
        Ok(_) => panic!("config was accepted"),
    }
}

#[test]
fn unsupported_configs_are_typed_errors() {
    let base = tiny_config();
    let cases: Vec<(UNetConfig, &str)> = vec![
        (
            UNetConfig {
                down_block_types: vec![
                    "DownBlock2D".into(),
                    "AttnDownBlock2D".into(),
                    "CrossAttnDownBlock2D".into(),
                ],
                ..base.clone()
            },
            "AttnDownBlock2D",
        ),
        (
            UNetConfig {
                mid_block_type: None,
                ..base.clone()
            },
            "mid_block_type",
        ),
        (
            UNetConfig {
                addition_embed_type: Some("text".into()),
                ..base.clone()
            },
            "addition_embed_type",
        ),
        (
            UNetConfig {
                attention_head_dim: PerBlock::Each(vec![2, 4, 7]),
                ..base.clone()
            },
            "heads",
        ),
        (
            UNetConfig {
                transformer_layers_per_block: PerBlock::Each(vec![1, 2]),
                ..base.clone()
            },
            "transformer_layers_per_block",
        ),
        (
            UNetConfig {
                class_embed_type: Some("timestep".into()),
                ..base.clone()
            },
            "class_embed_type",
        ),
        (
            UNetConfig {
                norm_num_groups: Some(24),
                ..base.clone()
            },
            "groups",
        ),
        (
            UNetConfig {
                cross_attention_dim: PerBlock::Each(vec![64, 64, 32]),
                ..base.clone()
            },
            "text states",
        ),
        (
            UNetConfig {
                act_fn: "gelu".into(),
                ..base.clone()
            },
            "activation",
        ),
    ];
    for (config, expected) in cases {
        let message = build_error(&config);
        assert!(
            message.contains(expected),
            "{message:?} should mention {expected}"
        );
    }
    // Nested transformer depths (asymmetric UNets) do not even parse.
    let nested = SDXL_BASE_CONFIG.replace(
        r#""transformer_layers_per_block": [1, 2, 10]"#,
        r#""transformer_layers_per_block": [[1, 1], [2, 2], [10, 10]]"#,
    );
    assert!(matches!(
        UNetConfig::from_json(&nested),
        Err(EngineError::InvalidConfig { .. })
    ));
}

#[test]
fn bad_inputs_are_typed_errors() {
    let (_vs, unet) = load("sdxl_tiny");
    let t = cases("sdxl_tiny");
    let sample = &t["rect.sample"];
    let context = &t["rect.encoder_hidden_states"];
    let text_embeds = &t["rect.text_embeds"];
    let time_ids = &t["rect.time_ids"];
    let added = AddedConditioning {
        text_embeds,
        time_ids,
    };
    let expect_input_error = |result: darkroom_inference::Result<Tensor>, what: &str| match result {
        Err(EngineError::InvalidInput { component, message }) => {
            assert_eq!(component, "unet");
            assert!(message.contains(what), "{message:?} should mention {what}");
        }
        other => panic!("expected InvalidInput about {what}, got {other:?}"),
    };
    expect_input_error(unet.forward(sample, 10.0, context, None), "text_time");
    let short_ids = time_ids.narrow(1, 0, 5);
    let wrong = AddedConditioning {
        text_embeds,
        time_ids: &short_ids,
    };
    expect_input_error(
        unet.forward(sample, 10.0, context, Some(&wrong)),
        "time_ids",
    );
    expect_input_error(
        unet.forward(&sample.narrow(1, 0, 3), 10.0, context, Some(&added)),
        "channels",
    );
    expect_input_error(
        unet.forward(sample, 10.0, &context.narrow(2, 0, 16), Some(&added)),
        "encoder_hidden_states",
    );
    let three = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
    expect_input_error(
        unet.forward(sample, &three, context, Some(&added)),
        "timestep",
    );
    let down: Vec<Tensor> = (0..3)
        .map(|_| Tensor::zeros([2], (Kind::Float, Device::Cpu)))
        .collect();
    let mid = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    let control = ControlResiduals {
        down: &down,
        mid: &mid,
    };
    expect_input_error(
        unet.forward_with_control(sample, 10.0, context, Some(&added), Some(&control)),
        "down residuals",
    );
}
