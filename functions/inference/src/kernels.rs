//! Fused kernels in place of sequences libtorch runs as separate kernels, each a full pass over
//! memory: GroupNorm followed by SiLU (with the time embedding's per-channel addition before it,
//! as every UNet residual block does), GEGLU (the transformer blocks' feed-forward gate), and a
//! residual addition followed by the next sublayer's LayerNorm.
//!
//! The model code calls them through its `GroupNorm` and `LayerNorm` layers and [`geglu`]; they
//! run the fused CUDA kernels (`csrc/kernels.cu`, through the `cuda` module of CUDA builds)
//! when those are switched on and the tensors suit them, and otherwise the same libtorch
//! operations as before, so CPU results are unchanged. The fused kernels are off by default: a
//! CUDA pipeline turns them on with [`crate::pipeline::SdxlPipeline::use_kernels`] (`--kernels`
//! of `darkroom-sdxl` and `darkroom-bench`); they compute in f32 and round once, so their results
//! differ from libtorch's by rounding only (`examples/fused_kernels.rs` measures both on a GPU;
//! `tests/kernels.rs` runs them on the CPU under an emulation).

use std::sync::atomic::{AtomicBool, Ordering};

#[cfg(any(test, feature = "cuda"))]
use tch::Kind;
use tch::Tensor;

static FUSED: AtomicBool = AtomicBool::new(false);

/// Which kernels a pipeline runs GroupNorm+SiLU, GEGLU and add+LayerNorm with on CUDA, and in
/// which layout its convolutions work ([`crate::pipeline::SdxlPipeline::use_kernels`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelChoice {
    /// libtorch's kernels, NCHW convolutions (the default until the fused ones are measured).
    #[default]
    Stock,
    /// The fused kernels, NCHW convolutions.
    Fused,
    /// The fused kernels, channels-last convolution weights (so channels-last maps).
    FusedNhwc,
}

impl KernelChoice {
    /// Every choice, in order.
    pub const ALL: [KernelChoice; 3] = [Self::Stock, Self::Fused, Self::FusedNhwc];

    /// `stock`, `fused` or `fused-nhwc`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Stock => "stock",
            Self::Fused => "fused",
            Self::FusedNhwc => "fused-nhwc",
        }
    }
}

impl std::fmt::Display for KernelChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KernelChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|choice| choice.name() == s)
            .ok_or_else(|| format!("unknown kernels {s:?} (expected stock, fused or fused-nhwc)"))
    }
}

/// Whether the fused kernels replace libtorch's on CUDA tensors (process-wide; off by default).
pub fn fused_kernels() -> bool {
    FUSED.load(Ordering::Relaxed)
}

/// Compiles the fused kernels for CUDA device `device` and uses them from now on, process-wide.
/// Already recorded CUDA graphs keep the kernels they were recorded with.
///
/// # Errors
/// [`crate::EngineError::Cuda`] when NVRTC cannot compile them for the device's architecture.
#[cfg(feature = "cuda")]
pub fn enable_fused_kernels(device: usize) -> crate::Result<()> {
    crate::cuda::load_fused_kernels(device)?;
    FUSED.store(true, Ordering::Relaxed);
    Ok(())
}

/// Goes back to libtorch's kernels, process-wide.
pub fn disable_fused_kernels() {
    FUSED.store(false, Ordering::Relaxed);
}

/// `act(group_norm(xs + shift))`: `shift` `[n, c]` is added to every element of its channel of
/// `xs` `[n, c, ...]`; `act` is SiLU when `silu`, else the identity; `weight` and `bias` `[c]`.
pub fn group_norm(
    xs: &Tensor,
    shift: Option<&Tensor>,
    (weight, bias): (&Tensor, &Tensor),
    groups: i64,
    eps: f64,
    silu: bool,
) -> Tensor {
    #[cfg(feature = "cuda")]
    {
        let same_kind = |t: &Tensor| t.kind() == xs.kind() && t.is_contiguous();
        let fused = suits_fused(xs, true)
            && xs.dim() >= 2
            && same_kind(weight)
            && same_kind(bias)
            && shift.is_none_or(|s| same_kind(s) && s.dim() == 2);
        if fused {
            return crate::cuda::fused_group_norm(xs, shift, weight, bias, groups, eps, silu)
                .unwrap_or_else(|e| panic!("fused GroupNorm kernel: {e}"));
        }
    }
    let shifted;
    let input = match shift {
        Some(shift) => {
            let mut size = shift.size();
            size.resize(xs.dim(), 1);
            shifted = xs + shift.view(size.as_slice());
            &shifted
        }
        None => xs,
    };
    let normed = input.group_norm(groups, Some(weight), Some(bias), eps, true);
    if silu { normed.silu() } else { normed }
}

/// `(a + b, layer_norm(a + b))` over the last dimension (`weight`, `bias` of its width): a
/// residual addition and the LayerNorm of the next sublayer.
pub fn add_layer_norm(
    a: &Tensor,
    b: &Tensor,
    (weight, bias): (&Tensor, &Tensor),
    eps: f64,
) -> (Tensor, Tensor) {
    #[cfg(feature = "cuda")]
    {
        let like = |t: &Tensor| t.kind() == a.kind() && t.is_contiguous();
        if suits_fused(a, false) && like(b) && b.size() == a.size() && like(weight) && like(bias) {
            return crate::cuda::fused_add_layer_norm(a, b, weight, bias, eps)
                .unwrap_or_else(|e| panic!("fused add+LayerNorm kernel: {e}"));
        }
    }
    let sum = a + b;
    let width = sum.size().last().copied().unwrap_or(1);
    let normed = sum.layer_norm([width], Some(weight), Some(bias), eps, true);
    (sum, normed)
}

/// GEGLU: `[..., 2 × inner]` → the first half times the exact GELU of the second.
pub fn geglu(projected: &Tensor) -> Tensor {
    #[cfg(feature = "cuda")]
    if suits_fused(projected, false) && projected.size().last().is_some_and(|d| d % 2 == 0) {
        return crate::cuda::fused_geglu(projected)
            .unwrap_or_else(|e| panic!("fused GEGLU kernel: {e}"));
    }
    let halves = projected.chunk(2, -1);
    &halves[0] * halves[1].gelu("none")
}

/// On, on a CUDA device, contiguous (or channels-last, where the kernel has that layout), in a
/// precision the kernels have. (A kernel failure then panics, as libtorch's operations do.)
#[cfg(feature = "cuda")]
fn suits_fused(xs: &Tensor, channels_last_too: bool) -> bool {
    fused_kernels()
        && xs.device().is_cuda()
        && matches!(xs.kind(), Kind::Float | Kind::Half | Kind::BFloat16)
        && (xs.is_contiguous() || (channels_last_too && is_channels_last(xs)))
}

/// Whether `xs` is a `[n, c, h, w]` tensor stored channels-last (`[n, h, w, c]` in memory).
pub fn is_channels_last(xs: &Tensor) -> bool {
    let (size, stride) = (xs.size(), xs.stride());
    let [_, c, h, w] = size[..] else {
        return false;
    };
    // Strides of size-1 dimensions are free.
    let expected = [h * w * c, 1, w * c, c];
    size.iter()
        .zip(stride.iter().zip(expected))
        .all(|(&n, (&s, e))| n == 1 || s == e)
}

/// `xs` `[n, c, h, w]` stored channels-last: the layout cuDNN's convolutions use natively on
/// recent GPUs (in NCHW, libtorch transposes around each of them).
pub fn to_channels_last(xs: &Tensor) -> Tensor {
    xs.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The unfused path is libtorch's operations, step by step.
    #[test]
    fn without_fused_kernels_group_norm_is_libtorchs_norm_then_silu() {
        let options = (Kind::Float, Device::Cpu);
        let xs = Tensor::randn([2, 8, 3, 5], options);
        let shift = Tensor::randn([2, 8], options);
        let weight = Tensor::rand([8], options) + 0.5;
        let bias = Tensor::randn([8], options);
        let affine = (&weight, &bias);
        let norm = |t: &Tensor| t.group_norm(4, Some(&weight), Some(&bias), 1e-6, true);
        let expected = norm(&(&xs + shift.view([2, 8, 1, 1]))).silu();
        let got = group_norm(&xs, Some(&shift), affine, 4, 1e-6, true);
        assert!(got.equal(&expected));
        assert!(group_norm(&xs, None, affine, 4, 1e-6, false).equal(&norm(&xs)));
    }

    #[test]
    fn kernel_choices_parse_from_their_names() {
        for choice in KernelChoice::ALL {
            assert_eq!(choice.name().parse::<KernelChoice>(), Ok(choice));
        }
        let error = "fast".parse::<KernelChoice>().expect_err("not a choice");
        assert!(error.contains("stock, fused or fused-nhwc"), "{error}");
    }

    #[test]
    fn channels_last_keeps_the_values_and_is_recognised() {
        let xs = Tensor::randn([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        assert!(!is_channels_last(&xs));
        let last = to_channels_last(&xs);
        assert!(is_channels_last(&last) && !last.is_contiguous());
        assert_eq!(last.stride(), [60, 1, 15, 3]);
        assert!(last.equal(&xs));
        assert!(!is_channels_last(&xs.view([2, 3, 20])));
        // A 1×1 map is both.
        assert!(is_channels_last(&Tensor::zeros(
            [2, 3, 1, 1],
            (Kind::Float, Device::Cpu)
        )));
    }

    #[test]
    fn without_fused_kernels_geglu_gates_the_first_half_with_the_second() {
        let projected = Tensor::from_slice(&[2.0f32, -1.0, 1.0, 0.0]).view([1, 4]);
        let got = Vec::<f32>::try_from(geglu(&projected).view([-1])).expect("f32");
        // gelu(1) = 0.841345; gelu(0) = 0.
        assert!((got[0] - 2.0 * 0.841_344_7).abs() < 1e-6, "{got:?}");
        assert_eq!(got[1], 0.0);
    }
}
