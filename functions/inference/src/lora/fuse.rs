//! Fusing a weighted set of LoRAs into the model's weights, from pristine copies.
//!
//! For every parameter any LoRA of the set adapts,
//! `W = cast(f32(W₀) + Σᵢ upᵢ @ (weightᵢ · scaleᵢ · downᵢ))` — computed in f32 on the model's
//! device, one accumulating GEMM per LoRA in the order the LoRAs are given (as peft's `merge`
//! adds one adapter after the other; peft scales the product rather than the down factor, which
//! differs only in rounding), then cast to the parameter's dtype and copied in place; `W₀` is a copy of the
//! parameter taken the first time any LoRA touched it. Parameters the previous set adapted and
//! this one does not are copied back from `W₀`. Every weight is therefore a function of `W₀`
//! and the current set only: switching A → B → A gives exactly the weights of loading A fresh,
//! with no drift from repeated fuse/unfuse, and switching costs one pass over the adapted layers.
//!
//! Memory: the pristine copies stay on the model's device, in its dtype — one extra copy of each
//! parameter any LoRA has adapted since the model was loaded (for a LoRA on every attention and
//! feed-forward linear of the SDXL UNet, about 1.8 GB in f16). Keeping them on the CPU instead
//! would save that device memory but put a host → device copy of every adapted weight (and the
//! f32 arithmetic on whichever side) into each switch: ~100 ms or more for such a set over PCIe,
//! against a budget of 50 ms, so the device it is.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use tch::{Device, Tensor, nn};

use super::{KeyProblem, LoraError, LoraModule, LoraWeights, Problem};
use crate::loader::Component;
use crate::pipeline::SdxlPipeline;

type ParameterKey = (Component, String);

/// The LoRA state of a model: the pristine copies of adapted weights and which weights the
/// current set changed. A pipeline owns one ([`SdxlPipeline::set_loras`]).
#[derive(Debug, Default)]
pub struct LoraFuser {
    pristine: HashMap<ParameterKey, Tensor>,
    applied: BTreeSet<ParameterKey>,
}

/// What one [`LoraFuser::apply`] did.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoraSwitch {
    /// Parameters computed from LoRAs.
    pub fused: usize,
    /// Parameters copied back to the base model's values.
    pub restored: usize,
    /// Bytes held by pristine copies afterwards.
    pub pristine_bytes: usize,
    /// Wall-clock time of the weight update (including a CUDA synchronisation).
    pub elapsed: Duration,
}

fn bytes(tensor: &Tensor) -> usize {
    tensor.numel() * tensor.kind().elt_size_in_bytes()
}

impl LoraFuser {
    /// No LoRA applied, no copies kept.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held by pristine copies.
    pub fn pristine_bytes(&self) -> usize {
        self.pristine.values().map(bytes).sum()
    }

    /// How many parameters the current set adapts.
    pub fn adapted(&self) -> usize {
        self.applied.len()
    }

    /// Makes the weights in `stores` those of the base model with `loras` (each with its weight)
    /// fused; an empty set restores the base model exactly.
    ///
    /// Every LoRA is checked against `stores` first (each parameter exists with the shape the
    /// LoRA was resolved for, each weight is finite); on any mismatch nothing is changed. A
    /// weight of 0 leaves a LoRA out.
    pub fn apply(
        &mut self,
        stores: &[(Component, &nn::VarStore)],
        loras: &[(&LoraWeights, f64)],
    ) -> Result<LoraSwitch, LoraError> {
        let variables: HashMap<Component, HashMap<String, Tensor>> = stores
            .iter()
            .map(|(component, vs)| (*component, vs.variables()))
            .collect();
        let mut plan: BTreeMap<ParameterKey, Vec<(&LoraModule, f64)>> = BTreeMap::new();
        for &(lora, weight) in loras {
            if !weight.is_finite() {
                return Err(LoraError::InvalidWeight {
                    path: lora.path().to_owned(),
                    weight,
                });
            }
            let problems: Vec<KeyProblem> = lora
                .modules()
                .iter()
                .filter_map(|module| {
                    let found = variables
                        .get(&module.component())
                        .and_then(|vars| vars.get(module.parameter()))
                        .map(Tensor::size);
                    let problem = match found {
                        None => Problem::UnknownModule {
                            component: module.component(),
                        },
                        Some(shape) if shape != module.shape() => Problem::Shape {
                            parameter: module.parameter().to_owned(),
                            expected: shape,
                            down: module.down().size(),
                            up: module.up().size(),
                        },
                        Some(_) => return None,
                    };
                    Some(KeyProblem {
                        key: format!("{} {}", module.component(), module.parameter()),
                        problem,
                    })
                })
                .collect();
            if !problems.is_empty() {
                return Err(LoraError::Mismatch {
                    path: lora.path().to_owned(),
                    keys: lora.modules().len(),
                    problems,
                    hint: Some("it was loaded for another model".to_owned()),
                });
            }
            if weight == 0.0 {
                continue;
            }
            for module in lora.modules() {
                plan.entry((module.component(), module.parameter().to_owned()))
                    .or_default()
                    .push((module, weight));
            }
        }

        let started = Instant::now();
        let variable = |key: &ParameterKey| {
            variables
                .get(&key.0)
                .and_then(|vars| vars.get(&key.1))
                .map(Tensor::shallow_clone)
        };
        let touched: BTreeSet<ParameterKey> = self
            .applied
            .union(&plan.keys().cloned().collect())
            .cloned()
            .collect();
        let mut counts = (0, 0);
        let result = tch::no_grad(|| {
            for key in &touched {
                let Some(var) = variable(key) else {
                    continue;
                };
                let fail = |source| (key.clone(), source);
                // Weights are handled as `[1, out, in·kh·kw]` matrices, the factors' layout
                // (whatever the weight's own layout: a convolution's may be channels-last).
                if !self.pristine.contains_key(key) {
                    // Only parameters of the new set are missing here (restored ones were
                    // copied when first adapted).
                    let copy = var
                        .f_reshape(matrix_shape(&var.size()))
                        .and_then(|matrix| {
                            let mut copy = matrix.f_empty_like()?;
                            copy.f_copy_(&matrix)?;
                            Ok(copy)
                        })
                        .map_err(fail)?;
                    self.pristine.insert(key.clone(), copy);
                }
                let Some(base) = self.pristine.get(key) else {
                    continue;
                };
                match plan.get(key) {
                    Some(modules) => {
                        let value = fused(base, modules).map_err(fail)?;
                        write_matrix(&var, &value).map_err(fail)?;
                        counts.0 += 1;
                    }
                    None => {
                        write_matrix(&var, base).map_err(fail)?;
                        counts.1 += 1;
                    }
                }
            }
            synchronize(stores);
            Ok(())
        });
        if let Err(((component, parameter), source)) = result {
            // Leave the model as the base: every touched weight that has a copy goes back.
            tch::no_grad(|| {
                for key in &touched {
                    if let (Some(var), Some(base)) = (variable(key), self.pristine.get(key)) {
                        let _ = write_matrix(&var, base);
                    }
                }
            });
            self.applied.clear();
            return Err(LoraError::Fuse {
                component,
                parameter,
                source,
            });
        }
        self.applied = plan.keys().cloned().collect();
        Ok(LoraSwitch {
            fused: counts.0,
            restored: counts.1,
            pristine_bytes: self.pristine_bytes(),
            elapsed: started.elapsed(),
        })
    }
}

/// Writes a `[1, out, in·kh·kw]` matrix into the weight it stands for, in place (recorded CUDA
/// graphs keep reading the same memory), whatever the weight's layout.
fn write_matrix(var: &Tensor, matrix: &Tensor) -> Result<(), tch::TchError> {
    let mut var = var.shallow_clone();
    var.f_copy_(&matrix.f_view(var.size().as_slice())?)?;
    Ok(())
}

/// `[1, out, in·kh·kw]` for a weight of shape `[out, in, kh, kw]` (or `[out, in]`).
fn matrix_shape(shape: &[i64]) -> [i64; 3] {
    let rows = shape.first().copied().unwrap_or(1);
    let cols = shape.iter().skip(1).product::<i64>();
    [1, rows, cols]
}

/// `W₀ + Σ scaleᵢ · upᵢ @ downᵢ` for a pristine `[1, out, in]` weight, one fused
/// multiply-add per LoRA in the weight's dtype (the matrix product accumulates in f32 on the GPU
/// and in the CPU's BLAS, and each result is rounded once).
fn fused(base: &Tensor, modules: &[(&LoraModule, f64)]) -> Result<Tensor, tch::TchError> {
    let mut sum: Option<Tensor> = None;
    for &(module, weight) in modules {
        let (up, down) = module.matrices();
        let scale = module.scale(weight);
        let next = sum
            .as_ref()
            .unwrap_or(base)
            .f_baddbmm(up, down, 1.0, scale)?;
        sum = Some(next);
    }
    Ok(sum.unwrap_or_else(|| base.shallow_clone()))
}

/// Waits for the GPU work of a switch, so its time is measured and its errors surface here.
fn synchronize(stores: &[(Component, &nn::VarStore)]) {
    let mut seen = BTreeSet::new();
    for (_, vs) in stores {
        if let Device::Cuda(index) = vs.device()
            && seen.insert(index)
        {
            tch::Cuda::synchronize(index as i64);
        }
    }
}

/// Switch times between two LoRA sets on one pipeline.
#[derive(Debug, Clone, Copy)]
pub struct SwitchBenchmark {
    /// Switches timed (half A → B, half B → A).
    pub switches: usize,
    /// Median switch time.
    pub median: Duration,
    /// Fastest switch.
    pub min: Duration,
    /// Slowest switch.
    pub max: Duration,
    /// Parameters fused by set A and by set B.
    pub fused: (usize, usize),
    /// Bytes of pristine copies held after the run.
    pub pristine_bytes: usize,
}

/// Times `rounds` × (A → B, B → A) switches on `pipeline` after one untimed A (which takes the
/// pristine copies), and leaves the pipeline without LoRAs.
pub fn benchmark_switch(
    pipeline: &mut SdxlPipeline,
    a: &[(&LoraWeights, f64)],
    b: &[(&LoraWeights, f64)],
    rounds: usize,
) -> crate::Result<SwitchBenchmark> {
    let first = pipeline.set_loras(a)?;
    let mut times = Vec::with_capacity(2 * rounds);
    let mut fused = (first.fused, 0);
    for _ in 0..rounds {
        let to_b = pipeline.set_loras(b)?;
        fused.1 = to_b.fused;
        times.push(to_b.elapsed);
        times.push(pipeline.set_loras(a)?.elapsed);
    }
    let pristine_bytes = pipeline.set_loras(&[])?.pristine_bytes;
    times.sort();
    Ok(SwitchBenchmark {
        switches: times.len(),
        median: times.get(times.len() / 2).copied().unwrap_or_default(),
        min: times.first().copied().unwrap_or_default(),
        max: times.last().copied().unwrap_or_default(),
        fused,
        pristine_bytes,
    })
}
