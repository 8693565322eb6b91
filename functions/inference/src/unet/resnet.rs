//! Residual blocks and resamplers of the UNet, after diffusers' `models/resnet.py`
//! (`ResnetBlock2D`), `models/downsampling.py` (`Downsample2D`) and `models/upsampling.py`
//! (`Upsample2D`).

use crate::layers;
use tch::Tensor;
use tch::nn::{self, Module};

use super::{Activation, ResnetTimeScaleShift};
use crate::Result;

/// Settings of a [`ResnetBlock2D`].
#[derive(Debug, Clone)]
pub struct ResnetBlock2DConfig {
    /// Input channels.
    pub in_channels: i64,
    /// Output channels.
    pub out_channels: i64,
    /// Width of the time embedding, or `None` for a block without `time_emb_proj` (as the VAE's).
    pub temb_channels: Option<i64>,
    /// Groups of `norm1`.
    pub groups: i64,
    /// Groups of `norm2` (diffusers' `groups_out`, defaulting to `groups`).
    pub groups_out: Option<i64>,
    /// Epsilon of both group norms.
    pub eps: f64,
    /// Nonlinearity (diffusers' `non_linearity`).
    pub act: Activation,
    /// How the time embedding enters (diffusers' `time_embedding_norm`).
    pub time_embedding_norm: ResnetTimeScaleShift,
    /// The output is divided by this.
    pub output_scale_factor: f64,
}

/// A pre-norm residual block conditioned on the time embedding: diffusers' `ResnetBlock2D`.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: layers::GroupNorm,
    conv1: nn::Conv2D,
    time_emb_proj: Option<nn::Linear>,
    norm2: layers::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
    act: Activation,
    time_embedding_norm: ResnetTimeScaleShift,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// Builds the block's layers under `path` with diffusers' parameter names.
    pub fn new(path: nn::Path, config: &ResnetBlock2DConfig) -> Result<Self> {
        let c = config;
        let groups_out = c.groups_out.unwrap_or(c.groups);
        super::check_groups(c.in_channels, c.groups)?;
        super::check_groups(c.out_channels, groups_out)?;
        let time_emb_proj = c.temb_channels.map(|temb| {
            let out = match c.time_embedding_norm {
                ResnetTimeScaleShift::Default => c.out_channels,
                ResnetTimeScaleShift::ScaleShift => 2 * c.out_channels,
            };
            layers::linear(&path / "time_emb_proj", temb, out, true)
        });
        let conv_shortcut = (c.in_channels != c.out_channels).then(|| {
            layers::conv2d(
                &path / "conv_shortcut",
                c.in_channels,
                c.out_channels,
                1,
                1,
                0,
            )
        });
        Ok(Self {
            norm1: layers::GroupNorm::new(&path / "norm1", c.groups, c.in_channels, c.eps),
            conv1: layers::conv2d(&path / "conv1", c.in_channels, c.out_channels, 3, 1, 1),
            time_emb_proj,
            norm2: layers::GroupNorm::new(&path / "norm2", groups_out, c.out_channels, c.eps),
            conv2: layers::conv2d(&path / "conv2", c.out_channels, c.out_channels, 3, 1, 1),
            conv_shortcut,
            act: c.act,
            time_embedding_norm: c.time_embedding_norm,
            output_scale_factor: c.output_scale_factor,
        })
    }

    /// `act(norm(xs + shift))`, `shift` `[b, c]` per channel: one fused pass for SiLU.
    fn norm_act(&self, norm: &layers::GroupNorm, xs: &Tensor, shift: Option<&Tensor>) -> Tensor {
        match self.act {
            Activation::Silu => norm.forward_with(xs, shift, true),
        }
    }

    /// `xs`: `[b, in, h, w]`; `temb`: `[b, temb_channels]` (the raw time embedding: the
    /// activation is applied here, as diffusers does). Returns `[b, out, h, w]`.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let hidden = self.conv1.forward(&self.norm_act(&self.norm1, xs, None));
        // `[b, out]` or, scale-shift, `[b, 2 × out]`.
        let temb = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(&self.act.forward(temb))),
            _ => None,
        };
        let hidden = match (self.time_embedding_norm, temb) {
            (ResnetTimeScaleShift::Default, temb) => {
                self.norm_act(&self.norm2, &hidden, temb.as_ref())
            }
            (ResnetTimeScaleShift::ScaleShift, Some(temb)) => {
                let chunks = temb.unsqueeze(-1).unsqueeze(-1).chunk(2, 1);
                let normed = self.norm2.forward(&hidden);
                self.act
                    .forward(&(normed * (&chunks[0] + 1.0) + &chunks[1]))
            }
            (ResnetTimeScaleShift::ScaleShift, None) => self.norm_act(&self.norm2, &hidden, None),
        };
        let hidden = self.conv2.forward(&hidden);
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs),
            None => xs.shallow_clone(),
        };
        let out = shortcut + hidden;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// Strided 3×3 convolution halving the resolution: diffusers' `Downsample2D` with
/// `use_conv=True` (parameters under `conv`).
#[derive(Debug)]
pub struct Downsample2D {
    conv: nn::Conv2D,
    pad_right_bottom: bool,
}

impl Downsample2D {
    /// `padding` is diffusers' `downsample_padding` (1 for SDXL); with 0 the input is first
    /// padded by one on the right and bottom, as diffusers does.
    pub fn new(path: nn::Path, channels: i64, out_channels: i64, padding: i64) -> Result<Self> {
        Ok(Self {
            conv: layers::conv2d(&path / "conv", channels, out_channels, 3, 2, padding),
            pad_right_bottom: padding == 0,
        })
    }

    /// `[b, c, h, w]` → `[b, out, ⌈h/2⌉, ⌈w/2⌉]` (with padding 1).
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        if self.pad_right_bottom {
            self.conv.forward(&xs.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Nearest-neighbour doubling followed by a 3×3 convolution: diffusers' `Upsample2D` with
/// `use_conv=True` (parameters under `conv`).
///
/// An exact doubling is computed without the doubled map: each output pixel's 3×3 window over
/// a nearest-doubled map covers only 2×2 distinct input pixels, so the four output phases —
/// (even, odd) row × (even, odd) column — are 2×2 convolutions of the input itself, whose taps
/// are sums of the 3×3 kernel's (row phase 0: `[w₀, w₁ + w₂]` over rows `i − 1, i`; phase 1:
/// `[w₀ + w₁, w₂]` over rows `i, i + 1`; columns alike). One convolution with the four phases'
/// kernels side by side computes them: 16 multiply-adds per input channel and input pixel
/// against 36, no 4×-sized intermediate map; the phases are then interleaved into the output.
/// The same sums in another order: results agree up to rounding (the tests compare with
/// diffusers). The phase kernels are summed from the weights at each call (so a LoRA fused into
/// the weights, or a CUDA graph replaying the call, always sees the current ones): small maps,
/// where that costs more than it saves, and forced sizes that are not an exact doubling take the
/// direct path.
#[derive(Debug)]
pub struct Upsample2D {
    conv: nn::Conv2D,
}

/// The least `batch × h × w` input pixels for which [`Upsample2D`] uses the phase convolution
/// on the CPU: below it, summing the kernels (about fifteen passes over a weight-sized tensor)
/// costs more than the smaller convolution saves (`examples/upsampler.rs`, 2 cores: 0.8× at 512
/// pixels, 1.7–1.9× from 2048).
const PHASES_FROM_PIXELS: i64 = 1024;

/// The same on a GPU, whose arithmetic is far faster relative to its memory: the saving is 20
/// multiply-adds per pixel and kernel entry against ~15 weight passes, and an H100 does ~500
/// multiply-adds in the time it moves one f16 element, so from ~4000 pixels (SDXL: the UNet's
/// second upsampler, 8192, and the VAE's, 16384 and more; the UNet's first, 2048, stays direct).
const PHASES_FROM_PIXELS_GPU: i64 = 4096;

fn phases_from_pixels(xs: &Tensor) -> i64 {
    if xs.device().is_cuda() {
        PHASES_FROM_PIXELS_GPU
    } else {
        PHASES_FROM_PIXELS
    }
}

impl Upsample2D {
    /// Builds the convolution `channels → out_channels`.
    pub fn new(path: nn::Path, channels: i64, out_channels: i64) -> Result<Self> {
        Ok(Self {
            conv: layers::conv2d(&path / "conv", channels, out_channels, 3, 1, 1),
        })
    }

    /// Doubles `[b, c, h, w]`, or resizes it to `output_size` when given: the UNet passes the
    /// size of the matching skip connection when the latent is not a multiple of the overall
    /// upsampling factor (diffusers' `forward_upsample_size`).
    pub fn forward(&self, xs: &Tensor, output_size: Option<[i64; 2]>) -> Tensor {
        let size = xs.size();
        let (h, w) = (size[size.len() - 2], size[size.len() - 1]);
        match output_size {
            Some(size) if size != [2 * h, 2 * w] => {
                self.conv.forward(&xs.upsample_nearest2d(size, None, None))
            }
            _ if size.len() == 4 && size[0] * h * w >= phases_from_pixels(xs) => {
                self.forward_phases(xs)
            }
            _ => self.forward_direct(xs),
        }
    }

    /// diffusers' formulation of an exact doubling, the reference [`Self::forward`] is checked
    /// and timed against (`examples/upsampler.rs`): the nearest-doubled map, then the 3×3
    /// convolution.
    pub fn forward_direct(&self, xs: &Tensor) -> Tensor {
        let size = xs.size();
        let (h, w) = (size[size.len() - 2], size[size.len() - 1]);
        self.conv
            .forward(&xs.upsample_nearest2d([2 * h, 2 * w], 2.0, 2.0))
    }

    /// The phase convolution of an exact doubling of `xs` `[batch, c, h, w]` (see the type's
    /// docs), whatever the map's size: what [`Self::forward`] runs for large maps.
    ///
    /// # Panics
    /// On a tensor that is not 4-d, as a convolution would.
    pub fn forward_phases(&self, xs: &Tensor) -> Tensor {
        let size = xs.size();
        assert_eq!(size.len(), 4, "Upsample2D takes [b, c, h, w], got {size:?}");
        let (batch, h, w) = (size[0], size[2], size[3]);
        let run_kind = self.conv.ws.kind();
        // Up to four taps meet in one phase tap: summed in f32, rounded once to the run dtype.
        let weight = &self.conv.ws.to_kind(tch::Kind::Float);
        let out = weight.size()[0];
        // The two phases' 2-tap kernels along `dim` (2: rows, 3: columns) of a 3-tap kernel.
        let phases = |w: &Tensor, dim: i64| -> [Tensor; 2] {
            let tap = |i| w.narrow(dim, i, 1);
            [
                Tensor::cat(&[tap(0), tap(1) + tap(2)], dim),
                Tensor::cat(&[tap(0) + tap(1), tap(2)], dim),
            ]
        };
        let kernels: Vec<Tensor> = phases(weight, 2)
            .iter()
            .flat_map(|rows| phases(rows, 3))
            .collect();
        let kernel = Tensor::cat(&kernels, 0).to_kind(run_kind);
        let bias = self.conv.bs.as_ref().map(|b| b.repeat([4]));
        // Phase (a, b)'s output pixel (i, j) is its 2×2 window at (i + a, j + b) of the padded
        // input: one valid convolution of the padded input, then four offset views.
        let all = xs.constant_pad_nd([1, 1, 1, 1]).conv2d(
            &kernel,
            bias.as_ref(),
            [1, 1],
            [0, 0],
            [1, 1],
            1,
        );
        let channels_last = crate::kernels::is_channels_last(&all) && !all.is_contiguous();
        // [b, out, h, 2, w, 2] seen through the output's memory order.
        let options = (all.kind(), all.device());
        let interleaved = if channels_last {
            Tensor::empty([batch, h, 2, w, 2, out], options).permute([0, 5, 1, 2, 3, 4])
        } else {
            Tensor::empty([batch, out, h, 2, w, 2], options)
        };
        for (phase, (a, b)) in [(0, 0), (0, 1), (1, 0), (1, 1)].into_iter().enumerate() {
            let source = all
                .narrow(1, phase as i64 * out, out)
                .narrow(2, a, h)
                .narrow(3, b, w);
            interleaved.select(3, a).select(4, b).copy_(&source);
        }
        if channels_last {
            interleaved
                .permute([0, 2, 3, 4, 5, 1])
                .view([batch, 2 * h, 2 * w, out])
                .permute([0, 3, 1, 2])
        } else {
            interleaved.view([batch, out, 2 * h, 2 * w])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;
    use tch::kind::FLOAT_CPU;

    #[test]
    fn the_phase_convolution_is_the_doubled_maps_convolution() {
        let vs = nn::VarStore::new(Device::Cpu);
        let up = Upsample2D::new(vs.root(), 6, 5).expect("an upsampler");
        tch::no_grad(|| {
            let mut weight = up.conv.ws.shallow_clone();
            weight.copy_(&Tensor::randn([5, 6, 3, 3], FLOAT_CPU));
            if let Some(bias) = &up.conv.bs {
                bias.shallow_clone().copy_(&Tensor::randn([5], FLOAT_CPU));
            }
        });
        // Non-square, odd sizes: every border of every phase.
        let xs = Tensor::randn([2, 6, 5, 7], FLOAT_CPU);
        let expected = up.forward_direct(&xs);
        for (name, input) in [
            ("contiguous", xs.shallow_clone()),
            ("channels-last", crate::kernels::to_channels_last(&xs)),
        ] {
            let actual = up.forward_phases(&input);
            assert_eq!(actual.size(), [2, 5, 10, 14], "{name}");
            let error = (&actual - &expected).abs().max().double_value(&[]);
            assert!(error < 1e-5, "{name}: {error}");
            // Small maps take the direct path, explicit doubling sizes too.
            assert!(up.forward(&input, None).equal(&expected), "{name}");
            assert!(
                up.forward(&input, Some([10, 14])).equal(&expected),
                "{name}"
            );
        }
        // The layout of the maps is kept (channels-last convolutions stay channels-last).
        let last_weights = Upsample2D::new(vs.root() / "last", 6, 5).expect("an upsampler");
        tch::no_grad(|| {
            let moved = crate::kernels::to_channels_last(&up.conv.ws);
            last_weights.conv.ws.shallow_clone().set_data(&moved);
        });
        let kept = last_weights.forward_phases(&crate::kernels::to_channels_last(&xs));
        assert!(crate::kernels::is_channels_last(&kept) && !kept.is_contiguous());
        assert!(up.forward_phases(&xs).is_contiguous());

        // Large enough maps take the phase convolution.
        let large = Tensor::randn([2, 6, 16, 32], FLOAT_CPU);
        const { assert!(2 * 16 * 32 >= PHASES_FROM_PIXELS) };
        assert!(up.forward(&large, None).equal(&up.forward_phases(&large)));
        let direct = up.forward_direct(&large);
        let error = (up.forward(&large, None) - &direct)
            .abs()
            .max()
            .double_value(&[])
            / direct.abs().max().double_value(&[]);
        assert!(error < 1e-6, "relative {error}");

        // In bf16 the phase kernels are summed in f32 and rounded once: no further from the f32
        // result than the direct bf16 path is (up to bf16's own step).
        let half = Upsample2D::new(vs.root() / "bf16", 6, 5).expect("an upsampler");
        tch::no_grad(|| {
            let mut weight = half.conv.ws.shallow_clone();
            weight.set_data(&up.conv.ws.to_kind(tch::Kind::BFloat16));
            if let (Some(bias), Some(reference)) = (&half.conv.bs, &up.conv.bs) {
                bias.shallow_clone()
                    .set_data(&reference.to_kind(tch::Kind::BFloat16));
            }
        });
        let reference =
            up.forward_direct(&xs.to_kind(tch::Kind::BFloat16).to_kind(tch::Kind::Float));
        let range = reference.abs().max().double_value(&[]);
        let error_of = |t: Tensor| {
            (t.to_kind(tch::Kind::Float) - &reference)
                .abs()
                .max()
                .double_value(&[])
                / range
        };
        let xs_half = xs.to_kind(tch::Kind::BFloat16);
        let direct_error = error_of(half.forward_direct(&xs_half));
        let phases_error = error_of(half.forward_phases(&xs_half));
        assert!(
            phases_error <= 2.0 * direct_error + 2f64.powi(-8),
            "bf16: phases {phases_error:.2e}, direct {direct_error:.2e}"
        );

        // A forced size that is not a doubling takes the direct path, as diffusers does.
        let forced = up.forward(&xs, Some([9, 13]));
        let resized = up.conv.forward(&xs.upsample_nearest2d([9, 13], None, None));
        assert!(forced.equal(&resized));
    }
}
