//! The weight loader against one tiny random SDXL pipeline saved by diffusers in every layout
//! (reference/single_file.py): a diffusers folder with fp16 variants, the same sharded, and a
//! single-file checkpoint in the original naming that diffusers' own `from_single_file` loads
//! back exactly. Values must match exactly (tolerance 0: the loader copies, it does not compute),
//! except where a dtype conversion is asked for, which must equal libtorch's own conversion.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use darkroom_inference::device::DType;
use darkroom_inference::loader::{
    Component, KeyMap, Layout, ModelError, ModelSource, SourceOptions, WeightVariant,
    load_var_store,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn fixture() -> PathBuf {
    common::fixture("single_file", &[])
}

fn folder() -> PathBuf {
    fixture().join("diffusers")
}

fn single_file() -> PathBuf {
    fixture().join("sdxl_tiny.safetensors")
}

fn open(path: &Path, dtype: DType) -> ModelSource {
    ModelSource::open(path, &SourceOptions::new(dtype)).unwrap()
}

fn open_single_file() -> ModelSource {
    ModelSource::open(
        single_file(),
        &SourceOptions::new(DType::F32).with_config_dir(folder()),
    )
    .unwrap()
}

/// A variable store with one zero variable per entry of `like`, of its name and shape — what a
/// module built with the upstream parameter names creates.
fn var_store_like<'a>(names: impl IntoIterator<Item = (&'a String, &'a Tensor)>) -> VarStore {
    let vs = VarStore::new(Device::Cpu);
    for (name, tensor) in names {
        let (parents, leaf) = name.rsplit_once('.').unwrap_or(("", name));
        let mut path = vs.root();
        for part in parents.split('.').filter(|p| !p.is_empty()) {
            path = path / part;
        }
        let _ = path.zeros(leaf, &tensor.size());
    }
    vs
}

fn assert_same_tensors(actual: &HashMap<String, Tensor>, expected: &HashMap<String, Tensor>) {
    let mut missing: Vec<_> = expected
        .keys()
        .filter(|k| !actual.contains_key(*k))
        .collect();
    let mut extra: Vec<_> = actual
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    missing.sort();
    extra.sort();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    for (name, value) in expected {
        let got = &actual[name];
        assert_eq!(got.size(), value.size(), "{name}");
        assert_eq!(got.kind(), value.kind(), "{name}");
        assert!(got.equal(value), "{name} differs");
    }
}

fn variables(vs: &VarStore) -> HashMap<String, Tensor> {
    vs.variables()
}

// --- layouts ---------------------------------------------------------------------------------

#[test]
fn diffusers_folder_components_and_configs() {
    let source = open(&folder(), DType::F32);
    assert_eq!(source.layout(), Layout::Diffusers);
    for component in Component::ALL {
        let c = source.component(component).unwrap();
        let dir = folder().join(component.name());
        assert_eq!(c.config.as_deref(), Some(dir.join("config.json").as_path()));
        let stem = match component {
            Component::Unet | Component::Vae => "diffusion_pytorch_model",
            _ => "model",
        };
        assert_eq!(c.files, vec![dir.join(format!("{stem}.safetensors"))]);
        assert!(c.index.is_none());
    }
    assert_eq!(
        source.tokenizer(),
        Some(folder().join("tokenizer").as_path())
    );
    assert_eq!(
        source.tokenizer_2(),
        Some(folder().join("tokenizer_2").as_path())
    );
    assert_eq!(
        source.scheduler_config(),
        Some(folder().join("scheduler/scheduler_config.json").as_path())
    );
    let unet = source.config_json(Component::Unet).unwrap().unwrap();
    assert_eq!(unet["layers_per_block"], 2);
}

/// The single file, read through the original-naming map, holds exactly the folder's
/// parameters: every name, shape and value (tolerance 0).
#[test]
fn single_file_reads_as_the_diffusers_folder() {
    let diffusers = open(&folder(), DType::F32);
    let single = open_single_file();
    assert_eq!(single.layout(), Layout::SingleFile);
    for component in Component::ALL {
        let c = single.component(component).unwrap();
        assert_eq!(c.files, vec![single_file()]);
        assert_eq!(
            c.config.as_deref(),
            Some(
                folder()
                    .join(component.name())
                    .join("config.json")
                    .as_path()
            )
        );
        let expected = diffusers.read_component(component).unwrap();
        let actual = single.read_component(component).unwrap();
        assert!(!expected.is_empty());
        assert_same_tensors(&actual, &expected);
    }
}

/// Variable stores shaped like the modules fill identically from the folder and from the
/// single file, and equal the stored values.
#[test]
fn load_var_store_from_both_layouts() {
    let diffusers = open(&folder(), DType::F32);
    let single = open_single_file();
    for component in Component::ALL {
        let expected = diffusers.read_component(component).unwrap();
        for source in [&diffusers, &single] {
            let mut vs = var_store_like(&expected);
            source.load(&mut vs, component).unwrap();
            assert_same_tensors(&variables(&vs), &expected);
        }
    }
}

/// `CLIPTextModel` parameters load whether the module names them with transformers 5's flat
/// names (`embeddings.…`) or the older `text_model.embeddings.…`.
#[test]
fn clip_text_model_loads_with_or_without_text_model_prefix() {
    let diffusers = open(&folder(), DType::F32);
    let flat = diffusers.read_component(Component::TextEncoder).unwrap();
    assert!(flat.contains_key("final_layer_norm.weight"));
    let prefixed: HashMap<String, Tensor> = flat
        .iter()
        .map(|(k, v)| (format!("text_model.{k}"), v.shallow_clone()))
        .collect();
    for source in [&diffusers, &open_single_file()] {
        let mut vs = var_store_like(&prefixed);
        source.load(&mut vs, Component::TextEncoder).unwrap();
        assert_same_tensors(&variables(&vs), &prefixed);
    }
}

/// A variable store in bf16 or f16 gets the stored f32 values converted as libtorch converts, an
/// f32 store the stored f16 values.
#[test]
fn converts_to_the_variable_store_dtype() {
    let single = open_single_file();
    let expected = single.read_component(Component::TextEncoder2).unwrap();
    for kind in [Kind::BFloat16, Kind::Half] {
        let mut vs = var_store_like(&expected);
        vs.set_kind(kind);
        single.load(&mut vs, Component::TextEncoder2).unwrap();
        let converted: HashMap<String, Tensor> = expected
            .iter()
            .map(|(k, v)| (k.clone(), v.to_kind(kind)))
            .collect();
        assert_same_tensors(&variables(&vs), &converted);
    }
    // And the other way: fp16 files into an f32 store.
    let half = open(&folder(), DType::F16);
    let stored = half.read_component(Component::Unet).unwrap();
    assert!(stored.values().all(|t| t.kind() == Kind::Half));
    let widened: HashMap<String, Tensor> = stored
        .iter()
        .map(|(k, v)| (k.clone(), v.to_kind(Kind::Float)))
        .collect();
    let mut vs = var_store_like(&widened);
    half.load(&mut vs, Component::Unet).unwrap();
    assert_same_tensors(&variables(&vs), &widened);
}

/// The same load on the GPU in f16, when this machine has one.
#[test]
fn loads_onto_cuda_when_present() {
    if !tch::Cuda::is_available() {
        return;
    }
    let single = open_single_file();
    let expected = single.read_component(Component::Unet).unwrap();
    let mut vs = var_store_like(&expected);
    vs.set_kind(Kind::Half);
    vs.set_device(Device::Cuda(0));
    single.load(&mut vs, Component::Unet).unwrap();
    for (name, var) in variables(&vs) {
        assert_eq!(var.device(), Device::Cuda(0));
        assert!(
            var.to_device(Device::Cpu)
                .equal(&expected[&name].to_kind(Kind::Half)),
            "{name}"
        );
    }
}

/// Without a config folder a single file is taken to be SDXL base; the tiny model's VAE has three
/// levels, not four, so its stored decoder levels land on the wrong parameters: a typed error,
/// not a silently scrambled model.
#[test]
fn single_file_with_the_wrong_config_is_an_error() {
    let single = open(&single_file(), DType::F32);
    assert!(single.component(Component::Vae).unwrap().config.is_none());
    let expected = open(&folder(), DType::F32)
        .read_component(Component::Vae)
        .unwrap();
    let mut vs = var_store_like(&expected);
    let err = single.load(&mut vs, Component::Vae).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::MissingTensor { .. } | ModelError::UnexpectedTensor { .. }
        ),
        "{err}"
    );
    // Nothing was written.
    assert!(
        variables(&vs)
            .values()
            .all(|v| v.abs().sum(Kind::Float).double_value(&[]) == 0.0)
    );
}

// --- variants and shards -----------------------------------------------------------------------

/// Hard-links a model folder, leaving out files for which `skip` is true.
fn link_tree(from: &Path, to: &Path, skip: &dyn Fn(&Path) -> bool) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            link_tree(&path, &target, skip);
        } else if !skip(&path) {
            fs::hard_link(&path, &target).unwrap();
        }
    }
}

fn file_name(path: &Path) -> &str {
    path.file_name().unwrap().to_str().unwrap()
}

#[test]
fn fp16_variant_preference_and_fallback() {
    assert_eq!(WeightVariant::for_dtype(DType::F16), WeightVariant::Fp16);
    assert_eq!(WeightVariant::for_dtype(DType::Bf16), WeightVariant::Full);
    let half = open(&folder(), DType::F16);
    let full = open(&folder(), DType::Bf16);
    for component in Component::ALL {
        assert!(
            file_name(&half.component(component).unwrap().files[0]).ends_with(".fp16.safetensors")
        );
        assert!(!file_name(&full.component(component).unwrap().files[0]).contains("fp16"));
    }
    // The fp16 files hold the f32 weights rounded to f16.
    let rounded: HashMap<String, Tensor> = full
        .read_component(Component::Vae)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.to_kind(Kind::Half)))
        .collect();
    assert_same_tensors(&half.read_component(Component::Vae).unwrap(), &rounded);

    // Only one variant present: either preference takes it.
    let scratch = tempfile::tempdir().unwrap();
    let only_half = scratch.path().join("only_half");
    let only_full = scratch.path().join("only_full");
    link_tree(&folder(), &only_half, &|p| {
        file_name(p).ends_with(".safetensors") && !file_name(p).contains(".fp16.")
    });
    link_tree(&folder(), &only_full, &|p| file_name(p).contains(".fp16."));
    let fallback = open(&only_half, DType::F32);
    let fallback_full = open(&only_full, DType::F16);
    for component in Component::ALL {
        assert!(file_name(&fallback.component(component).unwrap().files[0]).contains(".fp16."));
        assert!(
            !file_name(&fallback_full.component(component).unwrap().files[0]).contains(".fp16.")
        );
    }
}

#[test]
fn sharded_components_load_like_single_files() {
    let sharded = open(&fixture().join("sharded"), DType::F32);
    let diffusers = open(&folder(), DType::F32);
    for (component, index) in [
        (
            Component::Unet,
            "diffusion_pytorch_model.safetensors.index.json",
        ),
        (Component::TextEncoder2, "model.safetensors.index.json"),
    ] {
        let c = sharded.component(component).unwrap();
        assert!(c.files.len() > 1, "{component}: {:?}", c.files);
        assert_eq!(file_name(c.index.as_deref().unwrap()), index);
        let expected = diffusers.read_component(component).unwrap();
        assert_same_tensors(&sharded.read_component(component).unwrap(), &expected);
        let mut vs = var_store_like(&expected);
        sharded.load(&mut vs, component).unwrap();
        assert_same_tensors(&variables(&vs), &expected);
    }
}

/// A shard index may only name shard files next to it.
#[test]
fn shard_index_escaping_its_folder_is_rejected() {
    let scratch = tempfile::tempdir().unwrap();
    let model = scratch.path().join("model");
    link_tree(&fixture().join("sharded"), &model, &|_| false);
    let index = model.join("text_encoder_2/model.safetensors.index.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&index).unwrap()).unwrap();
    let map = json["weight_map"].as_object_mut().unwrap();
    let first = map.keys().next().unwrap().clone();
    map.insert(first, "../../elsewhere.safetensors".into());
    fs::remove_file(&index).unwrap();
    fs::write(&index, serde_json::to_string(&json).unwrap()).unwrap();
    let err = ModelSource::open(&model, &SourceOptions::new(DType::F32)).unwrap_err();
    assert!(matches!(err, ModelError::InvalidConfig { .. }), "{err}");
}

// --- bad inputs --------------------------------------------------------------------------------

#[test]
fn missing_paths_and_unsupported_formats() {
    let scratch = tempfile::tempdir().unwrap();
    let options = SourceOptions::new(DType::F32);

    let err = ModelSource::open(scratch.path().join("nothing here"), &options).unwrap_err();
    assert!(matches!(err, ModelError::NotFound { .. }), "{err}");

    let err = ModelSource::open(scratch.path(), &options).unwrap_err();
    assert!(matches!(err, ModelError::UnsupportedFormat { .. }), "{err}");

    for name in ["model.bin", "sd_xl_base_1.0.ckpt"] {
        let pickle = scratch.path().join(name);
        fs::write(&pickle, b"\x80\x02}q\x00.").unwrap();
        let err = ModelSource::open(&pickle, &options).unwrap_err();
        match err {
            ModelError::UnsupportedFormat { hint, .. } => assert!(hint.contains("safetensors")),
            other => panic!("{name}: {other}"),
        }
    }

    // A diffusers folder whose UNet only has a pickle.
    let model = scratch.path().join("pickled");
    link_tree(&folder(), &model, &|p| {
        p.parent().unwrap().ends_with("unet") && file_name(p).contains("safetensors")
    });
    fs::write(
        model.join("unet/diffusion_pytorch_model.bin"),
        b"\x80\x02}q\x00.",
    )
    .unwrap();
    let err = ModelSource::open(&model, &options).unwrap_err();
    match err {
        ModelError::UnsupportedFormat { path, .. } => {
            assert!(path.ends_with("unet/diffusion_pytorch_model.bin"))
        }
        other => panic!("{other}"),
    }

    // A component without weights at all, and one without config.
    fs::remove_file(model.join("unet/diffusion_pytorch_model.bin")).unwrap();
    let err = ModelSource::open(&model, &options).unwrap_err();
    assert!(matches!(err, ModelError::NotFound { .. }), "{err}");
    fs::hard_link(
        folder().join("unet/diffusion_pytorch_model.safetensors"),
        model.join("unet/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    ModelSource::open(&model, &options).unwrap();
    fs::remove_file(model.join("vae/config.json")).unwrap();
    let err = ModelSource::open(&model, &options).unwrap_err();
    assert!(
        matches!(&err, ModelError::NotFound { path } if path.ends_with("vae/config.json")),
        "{err}"
    );

    // A broken model_index.json.
    let broken = scratch.path().join("broken");
    link_tree(&folder(), &broken, &|p| file_name(p) == "model_index.json");
    fs::write(broken.join("model_index.json"), b"{ not json").unwrap();
    let err = ModelSource::open(&broken, &options).unwrap_err();
    assert!(matches!(err, ModelError::InvalidConfig { .. }), "{err}");

    // A safetensors file that is not an SDXL checkpoint in the original naming.
    let vae = folder().join("vae/diffusion_pytorch_model.safetensors");
    let err = ModelSource::open(&vae, &options).unwrap_err();
    assert!(matches!(err, ModelError::UnsupportedFormat { .. }), "{err}");
}

fn copy_truncated(from: &Path, to: &Path, keep: usize) {
    let bytes = fs::read(from).unwrap();
    fs::write(to, &bytes[..keep]).unwrap();
}

#[test]
fn corrupt_files_are_typed_errors() {
    let scratch = tempfile::tempdir().unwrap();
    let options = SourceOptions::new(DType::F32);

    // Truncated single file: the header promises more data than there is.
    let truncated = scratch.path().join("truncated.safetensors");
    let len = fs::metadata(single_file()).unwrap().len() as usize;
    copy_truncated(&single_file(), &truncated, len - 100);
    let err = ModelSource::open(&truncated, &options).unwrap_err();
    assert!(matches!(err, ModelError::CorruptFile { .. }), "{err}");

    // Truncated inside the header.
    copy_truncated(&single_file(), &truncated, 64);
    let err = ModelSource::open(&truncated, &options).unwrap_err();
    assert!(matches!(err, ModelError::CorruptFile { .. }), "{err}");

    // Garbage: a plausible header length followed by no JSON; a file shorter than a header.
    let garbage = scratch.path().join("garbage.safetensors");
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"\x89PNG\r\n\x1a\n garbage bytes");
    fs::write(&garbage, &bytes).unwrap();
    let err = ModelSource::open(&garbage, &options).unwrap_err();
    assert!(matches!(err, ModelError::CorruptFile { .. }), "{err}");
    fs::write(&garbage, b"abc").unwrap();
    let err = ModelSource::open(&garbage, &options).unwrap_err();
    assert!(matches!(err, ModelError::CorruptFile { .. }), "{err}");

    // A truncated component file inside a diffusers folder fails at load time, untouched store.
    let weights = folder().join("text_encoder/model.safetensors");
    let expected = open(&folder(), DType::F32)
        .read_component(Component::TextEncoder)
        .unwrap();
    let cut = scratch.path().join("cut.safetensors");
    copy_truncated(
        &weights,
        &cut,
        fs::metadata(&weights).unwrap().len() as usize - 4,
    );
    let mut vs = var_store_like(&expected);
    let err = load_var_store(
        &mut vs,
        &[cut],
        &KeyMap::diffusers(Component::TextEncoder),
        Component::TextEncoder,
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::CorruptFile { .. }), "{err}");
}

/// Writes the text encoder's tensors, edited by `edit`, as a new safetensors file.
fn edited_text_encoder(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    let mut tensors: Vec<(String, Tensor)> =
        common::read_tensors(&folder().join("text_encoder/model.safetensors"))
            .into_iter()
            .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let path = dir.join(format!("edited-{}.safetensors", tensors.len()));
    Tensor::write_safetensors(&tensors, &path).unwrap();
    path
}

fn load_text_encoder(file: PathBuf) -> (VarStore, ModelError) {
    let expected = open(&folder(), DType::F32)
        .read_component(Component::TextEncoder)
        .unwrap();
    let mut vs = var_store_like(&expected);
    let err = load_var_store(
        &mut vs,
        &[file],
        &KeyMap::diffusers(Component::TextEncoder),
        Component::TextEncoder,
    )
    .unwrap_err();
    (vs, err)
}

fn untouched(vs: &VarStore) -> bool {
    variables(vs)
        .values()
        .all(|v| v.abs().sum(Kind::Float).double_value(&[]) == 0.0)
}

#[test]
fn missing_unexpected_misshapen_and_non_float_tensors() {
    let scratch = tempfile::tempdir().unwrap();

    let file = edited_text_encoder(scratch.path(), |t| {
        t.retain(|(k, _)| k != "final_layer_norm.bias")
    });
    let (vs, err) = load_text_encoder(file);
    assert!(
        matches!(&err, ModelError::MissingTensor { name, component: Component::TextEncoder, .. } if name == "final_layer_norm.bias"),
        "{err}"
    );
    assert!(untouched(&vs));

    let file = edited_text_encoder(scratch.path(), |t| {
        t.push((
            "encoder.layers.9.mlp.fc1.weight".into(),
            Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)),
        ))
    });
    let (vs, err) = load_text_encoder(file);
    assert!(
        matches!(&err, ModelError::UnexpectedTensor { name, .. } if name == "encoder.layers.9.mlp.fc1.weight"),
        "{err}"
    );
    assert!(untouched(&vs));

    let file = edited_text_encoder(scratch.path(), |t| {
        let entry = t
            .iter_mut()
            .find(|(k, _)| k == "encoder.layers.0.mlp.fc1.weight")
            .unwrap();
        entry.1 = Tensor::zeros([5, 7], (Kind::Float, Device::Cpu));
    });
    let (vs, err) = load_text_encoder(file);
    match &err {
        ModelError::ShapeMismatch {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, "encoder.layers.0.mlp.fc1.weight");
            assert_eq!(expected, &vec![37, 32]);
            assert_eq!(found, &vec![5, 7]);
        }
        other => panic!("{other}"),
    }
    assert!(untouched(&vs));

    let file = edited_text_encoder(scratch.path(), |t| {
        let entry = t
            .iter_mut()
            .find(|(k, _)| k == "final_layer_norm.weight")
            .unwrap();
        entry.1 = entry.1.to_kind(Kind::Int);
    });
    let (vs, err) = load_text_encoder(file);
    assert!(
        matches!(&err, ModelError::DTypeUnsupported { name, .. } if name == "final_layer_norm.weight"),
        "{err}"
    );
    assert!(untouched(&vs));

    // A variable no file provides (the module has a parameter the checkpoint lacks).
    let expected = open(&folder(), DType::F32)
        .read_component(Component::TextEncoder)
        .unwrap();
    let mut vs = var_store_like(&expected);
    let _ = vs.root().zeros("extra_parameter", &[3]);
    let err = open(&folder(), DType::F32)
        .load(&mut vs, Component::TextEncoder)
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::MissingTensor { name, .. } if name == "extra_parameter"),
        "{err}"
    );
}

/// In a single file, unknown names under a model's prefix are errors; names outside the four
/// prefixes (trainer state) are ignored.
#[test]
fn single_file_unknown_keys() {
    let scratch = tempfile::tempdir().unwrap();
    let mut tensors: Vec<(String, Tensor)> =
        common::read_tensors(&single_file()).into_iter().collect();
    tensors.push((
        "optimizer.state.step".into(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    ));
    let with_extra = scratch.path().join("extra.safetensors");
    Tensor::write_safetensors(&tensors, &with_extra).unwrap();
    let options = SourceOptions::new(DType::F32).with_config_dir(folder());
    let expected = open(&folder(), DType::F32)
        .read_component(Component::Vae)
        .unwrap();
    let mut vs = var_store_like(&expected);
    ModelSource::open(&with_extra, &options)
        .unwrap()
        .load(&mut vs, Component::Vae)
        .unwrap();

    tensors.push((
        "first_stage_model.decoder.mid.attn_2.q.weight".into(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    ));
    let unknown = scratch.path().join("unknown.safetensors");
    Tensor::write_safetensors(&tensors, &unknown).unwrap();
    let source = ModelSource::open(&unknown, &options).unwrap();
    let err = source.read_component(Component::Vae).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnexpectedTensor { name, component: Component::Vae, .. } if name == "first_stage_model.decoder.mid.attn_2.q.weight"),
        "{err}"
    );
    // Other components are unaffected.
    source.read_component(Component::Unet).unwrap();
}

/// A decode-only VAE module can leave the encoder out explicitly.
#[test]
fn skipping_a_prefix() {
    let diffusers = open(&folder(), DType::F32);
    let expected: HashMap<String, Tensor> = diffusers
        .read_component(Component::Vae)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("encoder.") && !k.starts_with("quant_conv."))
        .collect();
    let mut vs = var_store_like(&expected);
    let c = diffusers.component(Component::Vae).unwrap();
    let err = load_var_store(&mut vs, &c.files, &c.key_map, Component::Vae).unwrap_err();
    assert!(matches!(err, ModelError::UnexpectedTensor { .. }), "{err}");
    let key_map = c
        .key_map
        .clone()
        .skipping("encoder.")
        .skipping("quant_conv.");
    load_var_store(&mut vs, &c.files, &key_map, Component::Vae).unwrap();
    assert_same_tensors(&variables(&vs), &expected);
}
