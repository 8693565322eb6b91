//! The UNet's resolution levels, after diffusers' `models/unets/unet_2d_blocks.py`:
//! `DownBlock2D`, `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D` and
//! `UpBlock2D` — the block types SDXL's UNet (and its ControlNets) are made of.

use tch::Tensor;
use tch::nn;

use super::attention::{Transformer2DModel, Transformer2DModelConfig};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};
use super::{Activation, ResnetTimeScaleShift};
use crate::Result;

/// Resnet settings every block of one UNet shares.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSettings {
    /// Width of the time embedding.
    pub temb_channels: i64,
    /// Group-norm groups (`norm_num_groups`).
    pub groups: i64,
    /// Group-norm epsilon (`norm_eps`).
    pub eps: f64,
    /// Nonlinearity (`act_fn`).
    pub act: Activation,
    /// How the time embedding enters (`resnet_time_scale_shift`).
    pub time_scale_shift: ResnetTimeScaleShift,
}

impl ResnetSettings {
    fn block(&self, in_channels: i64, out_channels: i64, scale: f64) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            groups_out: None,
            eps: self.eps,
            act: self.act,
            time_embedding_norm: self.time_scale_shift,
            output_scale_factor: scale,
        }
    }
}

/// Attention settings of one cross-attention block.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSettings {
    /// Heads of every attention layer (the per-block entry of diffusers' `attention_head_dim`,
    /// which, despite its name, counts heads).
    pub num_attention_heads: i64,
    /// [`super::attention::BasicTransformerBlock`]s per transformer.
    pub transformer_layers: i64,
    /// Width of the text states.
    pub cross_attention_dim: i64,
    /// Linear (SDXL) or 1×1-convolution projections in and out of the transformer.
    pub use_linear_projection: bool,
}

impl AttentionSettings {
    fn transformer(&self, channels: i64, groups: i64) -> Transformer2DModelConfig {
        Transformer2DModelConfig {
            num_attention_heads: self.num_attention_heads,
            attention_head_dim: channels / self.num_attention_heads,
            in_channels: channels,
            num_layers: self.transformer_layers,
            cross_attention_dim: Some(self.cross_attention_dim),
            norm_num_groups: groups,
            use_linear_projection: self.use_linear_projection,
        }
    }
}

/// Shape of a down block.
#[derive(Debug, Clone, Copy)]
pub struct DownBlockConfig {
    /// Input channels.
    pub in_channels: i64,
    /// Output channels.
    pub out_channels: i64,
    /// Resnets (and transformers) in the block (`layers_per_block`).
    pub num_layers: i64,
    /// Whether a strided convolution halves the resolution at the end (all but the last level).
    pub add_downsample: bool,
    /// Padding of that convolution (`downsample_padding`).
    pub downsample_padding: i64,
    /// Shared resnet settings.
    pub resnet: ResnetSettings,
}

/// Shape of an up block.
#[derive(Debug, Clone, Copy)]
pub struct UpBlockConfig {
    /// Channels of the skip connection from the next-deeper level, taken by the last resnet.
    pub in_channels: i64,
    /// Channels coming from the previous (deeper) up block.
    pub prev_output_channel: i64,
    /// Output channels.
    pub out_channels: i64,
    /// Resnets (and transformers) in the block (`layers_per_block + 1`).
    pub num_layers: i64,
    /// Whether the block ends with a ×2 upsampler (all but the last level).
    pub add_upsample: bool,
    /// Shared resnet settings.
    pub resnet: ResnetSettings,
}

/// Shape of the middle block.
#[derive(Debug, Clone, Copy)]
pub struct MidBlockConfig {
    /// Channels in and out.
    pub in_channels: i64,
    /// Transformer + resnet pairs after the first resnet (1 in every diffusers UNet).
    pub num_layers: i64,
    /// Resnet outputs are divided by this (`mid_block_scale_factor`).
    pub output_scale_factor: f64,
    /// Shared resnet settings.
    pub resnet: ResnetSettings,
    /// Attention settings.
    pub attention: AttentionSettings,
}

fn down_resnets(path: &nn::Path, c: &DownBlockConfig) -> Result<Vec<ResnetBlock2D>> {
    (0..c.num_layers)
        .map(|i| {
            let in_channels = if i == 0 {
                c.in_channels
            } else {
                c.out_channels
            };
            ResnetBlock2D::new(
                path / "resnets" / i,
                &c.resnet.block(in_channels, c.out_channels, 1.0),
            )
        })
        .collect()
}

fn downsampler(path: &nn::Path, c: &DownBlockConfig) -> Result<Option<Downsample2D>> {
    c.add_downsample
        .then(|| {
            Downsample2D::new(
                path / "downsamplers" / 0,
                c.out_channels,
                c.out_channels,
                c.downsample_padding,
            )
        })
        .transpose()
}

fn up_resnets(path: &nn::Path, c: &UpBlockConfig) -> Result<Vec<ResnetBlock2D>> {
    (0..c.num_layers)
        .map(|i| {
            let skip = if i == c.num_layers - 1 {
                c.in_channels
            } else {
                c.out_channels
            };
            let input = if i == 0 {
                c.prev_output_channel
            } else {
                c.out_channels
            };
            ResnetBlock2D::new(
                path / "resnets" / i,
                &c.resnet.block(input + skip, c.out_channels, 1.0),
            )
        })
        .collect()
}

fn upsampler(path: &nn::Path, c: &UpBlockConfig) -> Result<Option<Upsample2D>> {
    c.add_upsample
        .then(|| Upsample2D::new(path / "upsamplers" / 0, c.out_channels, c.out_channels))
        .transpose()
}

/// Resnets, then an optional downsampler: diffusers' `DownBlock2D`.
#[derive(Debug)]
pub struct DownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock2D {
    /// Builds `resnets.N` and `downsamplers.0` under `path`.
    pub fn new(path: nn::Path, config: &DownBlockConfig) -> Result<Self> {
        Ok(Self {
            resnets: down_resnets(&path, config)?,
            downsampler: downsampler(&path, config)?,
        })
    }

    /// Returns the block's output and the states it hands to the up path (each resnet's output,
    /// then the downsampled one), as diffusers' `output_states`.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor) -> (Tensor, Vec<Tensor>) {
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        let mut hidden = xs.shallow_clone();
        for resnet in &self.resnets {
            hidden = resnet.forward(&hidden, Some(temb));
            states.push(hidden.shallow_clone());
        }
        if let Some(down) = &self.downsampler {
            hidden = down.forward(&hidden);
            states.push(hidden.shallow_clone());
        }
        (hidden, states)
    }
}

/// Resnet + transformer pairs, then an optional downsampler: diffusers' `CrossAttnDownBlock2D`.
#[derive(Debug)]
pub struct CrossAttnDownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl CrossAttnDownBlock2D {
    /// Builds `resnets.N`, `attentions.N` and `downsamplers.0` under `path`.
    pub fn new(
        path: nn::Path,
        config: &DownBlockConfig,
        attention: &AttentionSettings,
    ) -> Result<Self> {
        let transformer = attention.transformer(config.out_channels, config.resnet.groups);
        let attentions = (0..config.num_layers)
            .map(|i| Transformer2DModel::new(&path / "attentions" / i, &transformer))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            resnets: down_resnets(&path, config)?,
            attentions,
            downsampler: downsampler(&path, config)?,
        })
    }

    /// Its transformers.
    pub fn transformers(&self) -> &[Transformer2DModel] {
        &self.attentions
    }

    /// Like [`DownBlock2D::forward`], each resnet followed by its transformer over `context`.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> (Tensor, Vec<Tensor>) {
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        let mut hidden = xs.shallow_clone();
        for (resnet, attention) in self.resnets.iter().zip(&self.attentions) {
            hidden = resnet.forward(&hidden, Some(temb));
            hidden = attention.forward(&hidden, Some(context));
            states.push(hidden.shallow_clone());
        }
        if let Some(down) = &self.downsampler {
            hidden = down.forward(&hidden);
            states.push(hidden.shallow_clone());
        }
        (hidden, states)
    }
}

/// A resnet, then transformer + resnet pairs: diffusers' `UNetMidBlock2DCrossAttn`.
#[derive(Debug)]
pub struct UNetMidBlock2DCrossAttn {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl UNetMidBlock2DCrossAttn {
    /// Builds `resnets.N` and `attentions.N` under `path`.
    pub fn new(path: nn::Path, config: &MidBlockConfig) -> Result<Self> {
        let c = config;
        let resnet = c
            .resnet
            .block(c.in_channels, c.in_channels, c.output_scale_factor);
        let transformer = c.attention.transformer(c.in_channels, c.resnet.groups);
        let resnets = (0..=c.num_layers)
            .map(|i| ResnetBlock2D::new(&path / "resnets" / i, &resnet))
            .collect::<Result<Vec<_>>>()?;
        let attentions = (0..c.num_layers)
            .map(|i| Transformer2DModel::new(&path / "attentions" / i, &transformer))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            resnets,
            attentions,
        })
    }

    /// Its transformers.
    pub fn transformers(&self) -> &[Transformer2DModel] {
        &self.attentions
    }

    /// `[b, c, h, w]` → `[b, c, h, w]`.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> Tensor {
        let mut resnets = self.resnets.iter();
        let mut hidden = match resnets.next() {
            Some(first) => first.forward(xs, Some(temb)),
            None => xs.shallow_clone(),
        };
        for (attention, resnet) in self.attentions.iter().zip(resnets) {
            hidden = attention.forward(&hidden, Some(context));
            hidden = resnet.forward(&hidden, Some(temb));
        }
        hidden
    }
}

/// Takes the skip connections for an up block off the end of `skips`, last first.
fn pop_skip<'a>(skips: &mut &'a [Tensor]) -> Option<&'a Tensor> {
    let (last, rest) = skips.split_last()?;
    *skips = rest;
    Some(last)
}

/// Resnets over the input concatenated with skip connections, then an optional upsampler:
/// diffusers' `UpBlock2D`.
#[derive(Debug)]
pub struct UpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock2D {
    /// Builds `resnets.N` and `upsamplers.0` under `path`.
    pub fn new(path: nn::Path, config: &UpBlockConfig) -> Result<Self> {
        Ok(Self {
            resnets: up_resnets(&path, config)?,
            upsampler: upsampler(&path, config)?,
        })
    }

    /// Number of skip connections the block consumes.
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// `skips`: this block's skip connections in the order the down path produced them (the
    /// last one is used first). `upsample_size` forces the upsampler's output size.
    pub fn forward(
        &self,
        xs: &Tensor,
        mut skips: &[Tensor],
        temb: &Tensor,
        upsample_size: Option<[i64; 2]>,
    ) -> Tensor {
        let mut hidden = xs.shallow_clone();
        for resnet in &self.resnets {
            if let Some(skip) = pop_skip(&mut skips) {
                hidden = Tensor::cat(&[&hidden, skip], 1);
            }
            hidden = resnet.forward(&hidden, Some(temb));
        }
        match &self.upsampler {
            Some(up) => up.forward(&hidden, upsample_size),
            None => hidden,
        }
    }
}

/// [`UpBlock2D`] with a transformer after each resnet: diffusers' `CrossAttnUpBlock2D`.
#[derive(Debug)]
pub struct CrossAttnUpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl CrossAttnUpBlock2D {
    /// Builds `resnets.N`, `attentions.N` and `upsamplers.0` under `path`.
    pub fn new(
        path: nn::Path,
        config: &UpBlockConfig,
        attention: &AttentionSettings,
    ) -> Result<Self> {
        let transformer = attention.transformer(config.out_channels, config.resnet.groups);
        let attentions = (0..config.num_layers)
            .map(|i| Transformer2DModel::new(&path / "attentions" / i, &transformer))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            resnets: up_resnets(&path, config)?,
            attentions,
            upsampler: upsampler(&path, config)?,
        })
    }

    /// Number of skip connections the block consumes.
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// Its transformers.
    pub fn transformers(&self) -> &[Transformer2DModel] {
        &self.attentions
    }

    /// Like [`UpBlock2D::forward`], each resnet followed by its transformer over `context`.
    pub fn forward(
        &self,
        xs: &Tensor,
        mut skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<[i64; 2]>,
    ) -> Tensor {
        let mut hidden = xs.shallow_clone();
        for (resnet, attention) in self.resnets.iter().zip(&self.attentions) {
            if let Some(skip) = pop_skip(&mut skips) {
                hidden = Tensor::cat(&[&hidden, skip], 1);
            }
            hidden = resnet.forward(&hidden, Some(temb));
            hidden = attention.forward(&hidden, Some(context));
        }
        match &self.upsampler {
            Some(up) => up.forward(&hidden, upsample_size),
            None => hidden,
        }
    }
}

/// A down block of either type, as the UNet (and a ControlNet) holds them.
#[derive(Debug)]
pub enum DownBlock {
    /// `DownBlock2D`.
    Plain(DownBlock2D),
    /// `CrossAttnDownBlock2D`.
    CrossAttn(CrossAttnDownBlock2D),
}

impl DownBlock {
    /// Its transformers (none for a plain block).
    pub fn transformers(&self) -> &[Transformer2DModel] {
        match self {
            DownBlock::Plain(_) => &[],
            DownBlock::CrossAttn(block) => block.transformers(),
        }
    }

    /// Runs the block; `context` is only read by cross-attention blocks.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> (Tensor, Vec<Tensor>) {
        match self {
            DownBlock::Plain(block) => block.forward(xs, temb),
            DownBlock::CrossAttn(block) => block.forward(xs, temb, context),
        }
    }
}

/// An up block of either type.
#[derive(Debug)]
pub enum UpBlock {
    /// `UpBlock2D`.
    Plain(UpBlock2D),
    /// `CrossAttnUpBlock2D`.
    CrossAttn(CrossAttnUpBlock2D),
}

impl UpBlock {
    /// Its transformers (none for a plain block).
    pub fn transformers(&self) -> &[Transformer2DModel] {
        match self {
            UpBlock::Plain(_) => &[],
            UpBlock::CrossAttn(block) => block.transformers(),
        }
    }

    /// Number of skip connections the block consumes.
    pub fn num_skips(&self) -> usize {
        match self {
            UpBlock::Plain(block) => block.num_skips(),
            UpBlock::CrossAttn(block) => block.num_skips(),
        }
    }

    /// Runs the block; `context` is only read by cross-attention blocks.
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<[i64; 2]>,
    ) -> Tensor {
        match self {
            UpBlock::Plain(block) => block.forward(xs, skips, temb, upsample_size),
            UpBlock::CrossAttn(block) => block.forward(xs, skips, temb, context, upsample_size),
        }
    }
}
