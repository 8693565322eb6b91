//! The VAE against diffusers' `AutoencoderKL` on tiny random-weight models (reference/vae.py),
//! CPU, f32.
//!
//! Tolerances: relative error (max |a − b| / max |b|) ≤ 1e-4 for every float tensor; the
//! image conversions are exact (identical u8 bytes, identical pixel floats) on the reference's
//! own decoder output, and within 1/255 per byte on ours (its 1e-4 differences may flip a
//! rounding at a .5 boundary).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::sync::Mutex;

use darkroom_inference::EngineError;
use darkroom_inference::kernels::to_channels_last;
use darkroom_inference::vae::{
    AutoencoderKL, DiagonalGaussian, LatentSample, SampleSize, Vae, VaeConfig, image_to_tensor,
    tensor_to_image,
};
use image::RgbImage;
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;
/// The seed reference/vae.py gives `torch.Generator` for `latent_dist.sample`.
const SAMPLE_SEED: i64 = 1234;

/// libtorch's default CPU generator is process-wide: building a model (random initialization)
/// on another test thread between `manual_seed` and the draw would shift the draw.
static RNG: Mutex<()> = Mutex::new(());

fn fixture() -> PathBuf {
    common::fixture("vae", &[])
}

fn load(variant: &str) -> Vae {
    Vae::load(
        &fixture().join(variant).join("vae"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap()
}

fn assert_close(name: &str, actual: &Tensor, expected: &Tensor) -> f64 {
    let error = common::relative_error(actual, expected);
    println!("{name}: relative error {error:.3e}");
    assert!(
        error <= TOLERANCE,
        "{name}: relative error {error:e} > {TOLERANCE:e}"
    );
    error
}

/// NHWC u8 tensor → RGB images.
fn images_from_nhwc(tensor: &Tensor) -> Vec<RgbImage> {
    let size = tensor.size();
    (0..size[0])
        .map(|i| {
            let bytes = Vec::<u8>::try_from(tensor.get(i).contiguous().view([-1])).unwrap();
            RgbImage::from_raw(size[2] as u32, size[1] as u32, bytes).unwrap()
        })
        .collect()
}

fn max_byte_difference(a: &[RgbImage], b: &[RgbImage]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.dimensions(), y.dimensions());
            x.as_raw()
                .iter()
                .zip(y.as_raw())
                .map(|(p, q)| p.abs_diff(*q))
        })
        .max()
        .unwrap_or(0)
}

/// Every check of one fixture variant: preprocessing, encoder distribution, seeded sample,
/// img2img scaling, text2img unscale + decode, postprocessing.
fn matches_diffusers(variant: &str) {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let vae = load(variant);
    let model = vae.model();
    let reference = common::read_tensors(&fixture().join(variant).join("reference.safetensors"));

    // Preprocessing: u8 → [-1, 1], bit for bit.
    let images = images_from_nhwc(&reference["image_u8"]);
    let pixels = Tensor::cat(
        &images
            .iter()
            .map(|image| image_to_tensor(image, Device::Cpu))
            .collect::<Vec<_>>(),
        0,
    );
    assert!(
        pixels.equal(&reference["pixels"]),
        "{variant}: preprocessing differs"
    );

    // Encoder → DiagonalGaussian.
    let distribution = model.encode(&pixels);
    assert_close(
        &format!("{variant} mean"),
        distribution.mean(),
        &reference["mean"],
    );
    assert_close(
        &format!("{variant} logvar"),
        distribution.logvar(),
        &reference["logvar"],
    );
    assert_close(
        &format!("{variant} std"),
        distribution.std(),
        &reference["std"],
    );
    assert!(distribution.mode().equal(distribution.mean()));

    // latent_dist.sample(torch.Generator().manual_seed(1234)): the same normal draw.
    tch::manual_seed(SAMPLE_SEED);
    let noise = distribution.draw_noise(tch::Kind::Float);
    assert!(
        noise.equal(&reference["noise"]),
        "{variant}: noise draw differs"
    );
    let sample = distribution.sample(&noise).unwrap();
    assert_close(&format!("{variant} sample"), &sample, &reference["sample"]);

    // img2img's prepare_latents, drawing from the default generator after encoding.
    tch::manual_seed(SAMPLE_SEED);
    let init_latents = model
        .latents_from_image(&pixels, LatentSample::DefaultGenerator, Kind::Float)
        .unwrap();
    assert_close(
        &format!("{variant} init_latents"),
        &init_latents,
        &reference["init_latents"],
    );
    let with_noise = model
        .latents_from_image(&pixels, LatentSample::Noise(&noise), Kind::Float)
        .unwrap();
    assert_close(
        &format!("{variant} init_latents (noise)"),
        &with_noise,
        &reference["init_latents"],
    );
    // scale and unscale are inverse.
    assert_close(
        &format!("{variant} unscale∘scale"),
        &model.unscale_latents(&model.scale_latents(&sample)),
        &sample,
    );

    // text2img: unscale + decode.
    let decoded = model.image_from_latents(&reference["latents"]).unwrap();
    assert_close(
        &format!("{variant} decoded"),
        &decoded,
        &reference["decoded"],
    );

    // Postprocessing: exact on the reference's decoder output, ±1 on ours.
    let expected_u8 = images_from_nhwc(&reference["decoded_u8"]);
    let from_reference = tensor_to_image(&reference["decoded"]).unwrap();
    assert_eq!(
        max_byte_difference(&from_reference, &expected_u8),
        0,
        "{variant}: postprocessing differs"
    );
    let ours = tensor_to_image(&decoded).unwrap();
    let difference = max_byte_difference(&ours, &expected_u8);
    println!("{variant} decoded_u8: max byte difference {difference}");
    assert!(
        difference <= 1,
        "{variant}: decoded bytes differ by {difference}"
    );
}

#[test]
fn small_vae_matches_diffusers() {
    matches_diffusers("small");
}

#[test]
fn deep_vae_with_latents_mean_and_std_matches_diffusers() {
    matches_diffusers("deep");
}

#[test]
fn plain_vae_without_quant_convs_or_attention_matches_diffusers() {
    matches_diffusers("plain");
}

#[test]
fn diagonal_gaussian_clamps_the_log_variance() {
    let reference = common::read_tensors(&fixture().join("gaussian.safetensors"));
    let distribution = DiagonalGaussian::new(&reference["parameters"]).unwrap();
    assert!(distribution.mean().equal(&reference["mean"]));
    assert!(distribution.logvar().equal(&reference["logvar"]));
    assert_close("gaussian std", distribution.std(), &reference["std"]);
    assert!(distribution.mode().equal(&reference["mode"]));
    assert_eq!(distribution.logvar().max().double_value(&[]), 20.0);
    assert_eq!(distribution.logvar().min().double_value(&[]), -30.0);

    let odd = Tensor::zeros([1, 3, 2, 2], (Kind::Float, Device::Cpu));
    assert!(matches!(
        DiagonalGaussian::new(&odd),
        Err(EngineError::InvalidInput { .. })
    ));
    let wrong_noise = Tensor::zeros([1, 1], (Kind::Float, Device::Cpu));
    assert!(matches!(
        distribution.sample(&wrong_noise),
        Err(EngineError::InvalidInput { .. })
    ));
}

#[test]
fn saved_configs_deserialize() {
    let config = VaeConfig::from_file(&fixture().join("deep/vae/config.json")).unwrap();
    assert_eq!(config.block_out_channels, vec![32, 64, 64]);
    assert_eq!(config.layers_per_block, 2);
    assert_eq!(config.norm_num_groups, 8);
    assert_eq!(config.scaling_factor, 0.13025);
    assert_eq!(config.shift_factor, None);
    assert_eq!(config.latents_std, Some(vec![0.9, 1.1, 0.8, 1.3]));
    assert!(config.force_upcast && config.use_quant_conv && config.mid_block_add_attention);
    assert_eq!(config.sample_size, SampleSize::Square(64));
    assert_eq!(config.vae_scale_factor(), 4);

    let plain = VaeConfig::from_file(&fixture().join("plain/vae/config.json")).unwrap();
    assert_eq!(plain.shift_factor, Some(0.0609));
    assert!(!plain.use_quant_conv && !plain.use_post_quant_conv && !plain.mid_block_add_attention);
    assert_eq!(plain.vae_scale_factor(), 1);
}

/// `stabilityai/stable-diffusion-xl-base-1.0/vae/config.json`, trimmed of diffusers' bookkeeping.
const SDXL_CONFIG: &str = r#"{
  "_class_name": "AutoencoderKL",
  "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "force_upcast": true,
  "in_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 2,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 1024,
  "scaling_factor": 0.13025,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

#[test]
fn sdxl_config_and_precision_policy() {
    let parsed: VaeConfig = serde_json::from_str(SDXL_CONFIG).unwrap();
    assert_eq!(parsed, VaeConfig::sdxl());
    let sdxl = VaeConfig::sdxl();
    sdxl.validate().unwrap();
    assert_eq!(sdxl.vae_scale_factor(), 8);
    assert_eq!(sdxl.run_kind(Kind::Half), Kind::Float);
    assert_eq!(sdxl.run_kind(Kind::BFloat16), Kind::BFloat16);
    assert_eq!(sdxl.run_kind(Kind::Float), Kind::Float);
    let fp16_fix = VaeConfig {
        force_upcast: false,
        ..VaeConfig::sdxl()
    };
    assert_eq!(fp16_fix.run_kind(Kind::Half), Kind::Half);
}

#[test]
fn unbuildable_configs_are_rejected() {
    let cases = [
        VaeConfig {
            block_out_channels: vec![32, 48],
            down_block_types: vec!["DownEncoderBlock2D".into(); 2],
            up_block_types: vec!["UpDecoderBlock2D".into(); 2],
            ..Default::default()
        },
        VaeConfig {
            block_out_channels: vec![32, 64],
            ..Default::default()
        },
        VaeConfig {
            down_block_types: vec!["AttnDownEncoderBlock2D".into()],
            ..Default::default()
        },
        VaeConfig {
            latents_mean: Some(vec![0.0; 3]),
            latents_std: Some(vec![1.0; 3]),
            ..Default::default()
        },
        VaeConfig {
            act_fn: "gelu".into(),
            ..Default::default()
        },
    ];
    for config in cases {
        let store = tch::nn::VarStore::new(Device::Cpu);
        assert!(
            matches!(
                AutoencoderKL::new(store.root(), &config),
                Err(EngineError::InvalidConfig {
                    component: "vae",
                    ..
                })
            ),
            "{config:?}"
        );
    }
    let missing = std::env::temp_dir().join("darkroom-no-such-vae/config.json");
    assert!(matches!(
        VaeConfig::from_file(&missing),
        Err(EngineError::InvalidConfig { .. })
    ));
}

#[test]
fn wrong_shapes_are_errors_not_panics() {
    let vae = {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        load("plain")
    };
    let model = vae.model();
    let cpu = (Kind::Float, Device::Cpu);
    let gray = Tensor::zeros([1, 1, 8, 8], cpu);
    assert!(matches!(
        model.latents_from_image(&gray, LatentSample::Mode, Kind::Float),
        Err(EngineError::InvalidInput { .. })
    ));
    let latents = Tensor::zeros([1, 3, 8, 8], cpu);
    assert!(matches!(
        model.image_from_latents(&latents),
        Err(EngineError::InvalidInput { .. })
    ));
    let rgba = Tensor::zeros([1, 4, 8, 8], cpu);
    assert!(matches!(
        tensor_to_image(&rgba),
        Err(EngineError::InvalidInput { .. })
    ));
    let small = {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        load("small")
    };
    let odd = Tensor::zeros([1, 3, 7, 8], cpu);
    assert!(matches!(
        small
            .model()
            .latents_from_image(&odd, LatentSample::Mode, Kind::Float),
        Err(EngineError::InvalidInput { .. })
    ));
    let mode = model
        .latents_from_image(
            &Tensor::zeros([1, 3, 8, 8], cpu),
            LatentSample::Mode,
            Kind::Float,
        )
        .unwrap();
    assert_eq!(mode.size(), vec![1, 4, 8, 8]);
}

#[test]
fn image_conversion_round_trips_and_clamps() {
    let image = RgbImage::from_fn(5, 3, |x, y| {
        image::Rgb([(x * 50) as u8, (y * 100) as u8, 255])
    });
    let tensor = image_to_tensor(&image, Device::Cpu);
    assert_eq!(tensor.size(), vec![1, 3, 3, 5]);
    assert_eq!(tensor.min().double_value(&[]), -1.0);
    assert_eq!(tensor.max().double_value(&[]), 1.0);
    let back = tensor_to_image(&tensor).unwrap();
    assert_eq!(back, vec![image]);

    // 0 → 0.5 → 127.5 → 128; values outside [-1, 1] clamp.
    let x = Tensor::from_slice(&[0.0f32, 1.5, -3.0, -0.5])
        .view([1, 1, 1, 4])
        .expand([1, 3, 1, 4], false);
    let bytes = tensor_to_image(&x).unwrap()[0]
        .pixels()
        .map(|p| p.0[0])
        .collect::<Vec<_>>();
    assert_eq!(bytes, vec![128, 255, 0, 64]);
}

/// The VAE in its own kind (bf16 here, as the engine may run it next to a bf16 UNet): inputs
/// are cast at the boundary and results stay close to the f32 reference (bf16 has 8 bits of
/// mantissa, so the bound is loose: 5e-2).
#[test]
fn runs_in_bfloat16_with_casts_at_the_boundary() {
    let vae = {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        Vae::load(&fixture().join("small/vae"), Device::Cpu, Kind::BFloat16).unwrap()
    };
    let model = vae.model();
    assert_eq!(
        (model.kind(), model.device()),
        (Kind::BFloat16, Device::Cpu)
    );
    let reference = common::read_tensors(&fixture().join("small/reference.safetensors"));

    let decoded = model.image_from_latents(&reference["latents"]).unwrap();
    assert_eq!(decoded.kind(), Kind::BFloat16);
    let error = common::relative_error(&decoded, &reference["decoded"]);
    println!("bf16 decoded: relative error {error:.3e}");
    assert!(error <= 5e-2, "bf16 decoded: relative error {error:e}");
    assert_eq!(tensor_to_image(&decoded).unwrap().len(), 2);

    let latents = model
        .latents_from_image(&reference["pixels"], LatentSample::Mode, Kind::Float)
        .unwrap();
    assert_eq!(latents.kind(), Kind::Float);
    let expected = &reference["mean"] * 0.13025;
    let error = common::relative_error(&latents, &expected);
    println!("bf16 mode latents: relative error {error:.3e}");
    assert!(error <= 5e-2, "bf16 mode latents: relative error {error:e}");

    let config = model.config().clone();
    let weights = fixture().join("small/vae/diffusion_pytorch_model.safetensors");
    assert!(matches!(
        Vae::from_weights(&config, &weights, Device::Cpu, Kind::Int),
        Err(EngineError::InvalidConfig { .. })
    ));
}

/// With the convolution weights stored channels-last (the pipeline's GPU layout option), the
/// maps run channels-last inside, and the VAE still matches diffusers and hands back contiguous
/// latents and images.
#[test]
fn channels_last_weights_match_diffusers_and_give_contiguous_outputs() {
    let vae = load("small");
    for mut var in vae.var_store().variables().into_values() {
        if var.dim() == 4 {
            let moved = to_channels_last(&var);
            tch::no_grad(|| var.set_data(&moved));
        }
    }
    let model = vae.model();
    let reference = common::read_tensors(&fixture().join("small/reference.safetensors"));

    let decoded = model.image_from_latents(&reference["latents"]).unwrap();
    assert!(decoded.is_contiguous());
    assert_close("channels-last decoded", &decoded, &reference["decoded"]);

    let distribution = model.encode(&reference["pixels"]);
    assert_close(
        "channels-last mean",
        distribution.mean(),
        &reference["mean"],
    );
    let latents = model
        .latents_from_image(&reference["pixels"], LatentSample::Mode, Kind::Float)
        .unwrap();
    assert!(latents.is_contiguous());
}
