//! Reading safetensors files by memory map, validated before anything is copied.
//!
//! Memory: a file is mapped, not read, so its bytes live in the page cache (shared, reclaimable)
//! rather than in the process's heap. Values go from the mapping into the variables through
//! [`super::upload`]: straight into CPU variables of the stored dtype, through a CPU tensor of
//! the stored values for the others (one tensor at a time: for SDXL at most ~250 MB, the f32
//! token embedding of the second text encoder), through two small pinned buffers to a GPU —
//! never a whole file.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::key_map::{KeyMap, Mapped, Transform};
use super::upload::{CopyFailed, StoredValues, Upload};
use super::{Component, ModelError};

/// A weights file mapped into memory.
pub(crate) struct MappedFile {
    path: PathBuf,
    map: Mmap,
}

impl MappedFile {
    pub(crate) fn open(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only (`Mmap`, from a file opened read-only), and the bytes are
        // only ever read through `&[u8]`. What Rust cannot rule out is another process changing
        // or truncating the file while it is mapped; model files are not written while the
        // engine loads them (a truncation would end the process with SIGBUS, not corrupt
        // memory silently). Every offset is validated against the mapped length before use.
        #[allow(unsafe_code)]
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Ok(MappedFile {
            path: path.to_owned(),
            map,
        })
    }

    /// The parsed header, checked against the file: a valid JSON header, offsets that tile the
    /// data exactly, sizes that match dtype × shape, data that reaches the end of the file.
    pub(crate) fn tensors(&self) -> Result<SafeTensors<'_>, ModelError> {
        SafeTensors::deserialize(&self.map).map_err(|e| ModelError::CorruptFile {
            path: self.path.clone(),
            message: describe(&e),
        })
    }

    /// The header's free-form `__metadata__` (string to string), if any.
    pub(crate) fn metadata(&self) -> Result<Option<HashMap<String, String>>, ModelError> {
        SafeTensors::read_metadata(&self.map)
            .map(|(_, metadata)| metadata.metadata().clone())
            .map_err(|e| ModelError::CorruptFile {
                path: self.path.clone(),
                message: describe(&e),
            })
    }
}

fn describe(error: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match error {
        E::HeaderTooSmall => "shorter than a safetensors header".to_owned(),
        E::InvalidHeaderLength => "the header length exceeds the file (truncated?)".to_owned(),
        E::MetadataIncompleteBuffer => {
            "the data does not end where the header says (truncated or padded)".to_owned()
        }
        E::InvalidHeader | E::InvalidHeaderStart | E::InvalidHeaderDeserialization => {
            "the header is not a safetensors JSON header".to_owned()
        }
        E::InvalidOffset(name) => format!("tensor {name} has offsets outside the data"),
        other => format!("invalid safetensors file: {other}"),
    }
}

/// The libtorch kind of a float dtype; `None` for the others.
pub(crate) fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F16 => Some(Kind::Half),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F32 => Some(Kind::Float),
        Dtype::F64 => Some(Kind::Double),
        _ => None,
    }
}

/// Where one parameter's values are stored.
struct Source<'a> {
    file: usize,
    stored_name: String,
    dtype: Dtype,
    stored_shape: Vec<i64>,
    data: &'a [u8],
    transform: Transform,
}

impl Source<'_> {
    /// The parameter's stored values: the bytes (only the chunk's, for a split), their dtype and
    /// shape, and whether the parameter is their transpose. Errors when the bytes do not fill
    /// `shape` (the header validation and `Transform::output_shape` already rule that out).
    fn values(&self, shape: &[i64]) -> Result<StoredValues<'_>, tch::TchError> {
        // Checked in `Plan::new`.
        let kind = kind_of(self.dtype).unwrap_or(Kind::Float);
        let data = self.data;
        let (bytes, shape, transpose) = match self.transform {
            Transform::Identity | Transform::SqueezeConv1x1 => (data, shape.to_vec(), false),
            Transform::Chunk { index, count } => {
                // Parts along the first dimension of a contiguous tensor are contiguous bytes.
                let part = data.len() / count.max(1);
                let bytes = data
                    .get(index * part..(index + 1) * part)
                    .unwrap_or_default();
                (bytes, shape.to_vec(), false)
            }
            Transform::Transpose => (data, self.stored_shape.clone(), true),
        };
        let needed = shape.iter().try_fold(kind.elt_size_in_bytes(), |n, &d| {
            usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
        });
        if needed != Some(bytes.len()) {
            return Err(tch::TchError::Shape(format!(
                "{} bytes stored for {} of shape {shape:?}",
                bytes.len(),
                self.stored_name
            )));
        }
        Ok(StoredValues {
            bytes,
            kind,
            shape,
            transpose,
        })
    }
}

/// All stored tensors of a component's files, mapped to parameter names.
struct Plan<'a> {
    files: &'a [PathBuf],
    sources: BTreeMap<String, Source<'a>>,
}

impl<'a> Plan<'a> {
    fn new(
        files: &'a [PathBuf],
        parsed: &'a [SafeTensors<'a>],
        key_map: &KeyMap,
        component: Component,
    ) -> Result<Self, ModelError> {
        let mut sources: BTreeMap<String, Source<'a>> = BTreeMap::new();
        for (file, tensors) in parsed.iter().enumerate() {
            let mut stored: Vec<(String, TensorView<'a>)> = tensors.tensors();
            stored.sort_by(|a, b| a.0.cmp(&b.0));
            for (stored_name, view) in stored {
                let targets = match key_map.map(&stored_name) {
                    Mapped::Targets(targets) => targets,
                    Mapped::Ignored => continue,
                    Mapped::Unknown => {
                        return Err(ModelError::UnexpectedTensor {
                            component,
                            file: files[file].clone(),
                            name: stored_name,
                        });
                    }
                };
                if kind_of(view.dtype()).is_none() {
                    return Err(ModelError::DTypeUnsupported {
                        file: files[file].clone(),
                        name: stored_name,
                        dtype: format!("{:?}", view.dtype()),
                    });
                }
                let stored_shape: Vec<i64> = view
                    .shape()
                    .iter()
                    .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
                    .collect();
                for target in targets {
                    let source = Source {
                        file,
                        stored_name: stored_name.clone(),
                        dtype: view.dtype(),
                        stored_shape: stored_shape.clone(),
                        data: view.data(),
                        transform: target.transform,
                    };
                    if let Some(previous) = sources.insert(target.name.clone(), source) {
                        let message = format!(
                            "parameter {} is stored twice ({} in {} and {})",
                            target.name,
                            previous.stored_name,
                            files[previous.file].display(),
                            stored_name
                        );
                        return Err(ModelError::CorruptFile {
                            path: files[file].clone(),
                            message,
                        });
                    }
                }
            }
        }
        Ok(Plan { files, sources })
    }

    /// The shape a parameter gets from its source, or a shape error naming `expected`.
    fn shape(
        &self,
        component: Component,
        name: &str,
        source: &Source<'_>,
        expected: &[i64],
    ) -> Result<Vec<i64>, ModelError> {
        let stored = source.stored_shape.clone();
        source
            .transform
            .output_shape(&stored)
            .ok_or_else(|| ModelError::ShapeMismatch {
                component,
                file: self.files[source.file].clone(),
                name: name.to_owned(),
                expected: expected.to_vec(),
                found: stored,
            })
    }
}

fn open_all(files: &[PathBuf]) -> Result<Vec<MappedFile>, ModelError> {
    if files.is_empty() {
        return Err(ModelError::NotFound {
            path: PathBuf::from("<no weights files>"),
        });
    }
    files.iter().map(|path| MappedFile::open(path)).collect()
}

fn parse_all(mapped: &[MappedFile]) -> Result<Vec<SafeTensors<'_>>, ModelError> {
    mapped.iter().map(MappedFile::tensors).collect()
}

/// The file a component's missing parameter is reported against: its only file, or the folder
/// of its shards.
fn files_label(files: &[PathBuf]) -> PathBuf {
    match files {
        [only] => only.clone(),
        [first, ..] => first.parent().map(Path::to_path_buf).unwrap_or_default(),
        [] => PathBuf::new(),
    }
}

/// Fills every variable of `vs` from the safetensors `files` of `component`, named through
/// `key_map`.
///
/// First everything is validated — each file's header and offsets, that every variable has
/// exactly one stored tensor of a float dtype and of its shape (after the key map's transform),
/// that every stored tensor of the component is used — and only then are values copied, under
/// `no_grad`, into the variables on their own device and in their own dtype (f16/bf16/f32/f64
/// stored values are converted). An error therefore leaves `vs` untouched, except
/// [`ModelError::Torch`] (libtorch failing mid-copy, e.g. out of device memory).
///
/// Variables are matched by their full name in the store (`vs.root()` paths joined with `.`),
/// so build the component's module on `vs.root()` and give each component its own store.
pub fn load_var_store(
    vs: &mut VarStore,
    files: &[PathBuf],
    key_map: &KeyMap,
    component: Component,
) -> Result<(), ModelError> {
    let mapped = open_all(files)?;
    let parsed = parse_all(&mapped)?;
    let plan = Plan::new(files, &parsed, key_map, component)?;

    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let mut wanted: BTreeMap<&str, (&str, &Tensor)> = BTreeMap::new();
    for (name, var) in &variables {
        let canonical = key_map.canonical(name);
        if key_map.is_skipped(canonical) {
            continue;
        }
        if let Some((other, _)) = wanted.insert(canonical, (name, var)) {
            return Err(ModelError::invalid_config(
                files_label(files),
                format!("variables {other} and {name} both take parameter {canonical}"),
            ));
        }
    }

    let mut copies = Vec::with_capacity(wanted.len());
    for (&canonical, &(name, var)) in &wanted {
        let Some(source) = plan.sources.get(canonical) else {
            return Err(ModelError::MissingTensor {
                component,
                file: files_label(files),
                name: name.to_owned(),
            });
        };
        let expected = var.size();
        let shape = plan.shape(component, name, source, &expected)?;
        if shape != expected {
            return Err(ModelError::ShapeMismatch {
                component,
                file: files[source.file].clone(),
                name: name.to_owned(),
                expected,
                found: shape,
            });
        }
        copies.push((name, var, source, shape));
    }
    if let Some((_, source)) = plan
        .sources
        .iter()
        .find(|(target, _)| !wanted.contains_key(target.as_str()))
    {
        return Err(ModelError::UnexpectedTensor {
            component,
            file: files[source.file].clone(),
            name: source.stored_name.clone(),
        });
    }

    let torch = |failed: CopyFailed| ModelError::Torch {
        component,
        name: failed.name,
        source: failed.source,
    };
    tch::no_grad(|| {
        let mut upload = Upload::new();
        for (name, var, source, shape) in copies {
            let values = source
                .values(&shape)
                .map_err(CopyFailed::naming(name))
                .map_err(torch)?;
            upload.put(name, var, &values).map_err(torch)?;
        }
        upload.finish().map_err(torch)
    })
}

/// Reads every parameter the `files` of `component` store, named and transformed through
/// `key_map`, as CPU tensors in the stored dtype (diffusers/transformers names; for
/// `CLIPTextModel` without the optional `text_model.` prefix, see [`KeyMap`]).
///
/// Meant for tests and tools (the values are copied into memory); the engine loads with
/// [`load_var_store`].
pub fn read_tensors(
    files: &[PathBuf],
    key_map: &KeyMap,
    component: Component,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let mapped = open_all(files)?;
    let parsed = parse_all(&mapped)?;
    let plan = Plan::new(files, &parsed, key_map, component)?;
    let mut out = HashMap::with_capacity(plan.sources.len());
    for (name, source) in &plan.sources {
        let shape = plan.shape(component, name, source, &[])?;
        let tensor = source
            .values(&shape)
            .and_then(|values| values.to_cpu_tensor())
            .and_then(|t| t.f_contiguous())
            .map_err(|e| ModelError::Torch {
                component,
                name: name.clone(),
                source: e,
            })?;
        out.insert(name.clone(), tensor);
    }
    Ok(out)
}
