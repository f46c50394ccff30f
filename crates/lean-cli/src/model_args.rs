//! The model options every model-building subcommand takes.

use anyhow::{bail, Context, Result};
use clap::Args;
use lean_models::ModelOptions;
use lean_ops::{LeanInit, Stencil};

/// Options that change a model's shape or its lean knobs.
#[derive(Args, Debug, Clone, Default)]
pub struct ModelArgs {
    /// Number of classes (default: the model's, 1000 ImageNet / 10 small-image).
    #[arg(long)]
    pub num_classes: Option<usize>,
    /// Input channels (1 for grey images).
    #[arg(long)]
    pub in_channels: Option<usize>,
    /// Width multiplier (MobileNetV2 any, ShuffleNetV2 0.5/1.0/1.5/2.0).
    #[arg(long)]
    pub width: Option<f64>,
    /// Lean models: stencil of the grouped branch (five, four, h3, v3, full).
    #[arg(long)]
    pub stencil: Option<String>,
    /// Lean models: input channels per group (1 = depthwise).
    #[arg(long)]
    pub group_size: Option<usize>,
    /// Lean models: keep the strided 3x3 convolutions dense.
    #[arg(long)]
    pub dense_downsample: bool,
    /// Lean models: initialisation of new weights (balanced, fanout).
    #[arg(long)]
    pub lean_init: Option<String>,
}

impl ModelArgs {
    /// The registry options.
    pub fn options(&self) -> Result<ModelOptions> {
        let stencil = match &self.stencil {
            Some(s) => Some(s.parse::<Stencil>().with_context(|| format!("--stencil {s}"))?),
            None => None,
        };
        let lean_init = match &self.lean_init {
            Some(s) => Some(s.parse::<LeanInit>().with_context(|| format!("--lean-init {s}"))?),
            None => None,
        };
        if self.group_size == Some(0) {
            bail!("--group-size must be at least 1");
        }
        Ok(ModelOptions {
            num_classes: self.num_classes,
            in_channels: self.in_channels,
            width: self.width,
            stencil,
            group_size: self.group_size,
            dense_downsample: self.dense_downsample.then_some(true),
            lean_init,
            dilate_last: None,
            features_only: false,
        })
    }
}

/// Parses `C,H,W`.
pub fn parse_input_size(s: &str) -> Result<[usize; 3]> {
    let v: Vec<usize> = s
        .split(',')
        .map(|d| d.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--input-size `{s}`: expected C,H,W"))?;
    match v[..] {
        [c, h, w] if c * h * w > 0 => Ok([c, h, w]),
        _ => bail!("--input-size `{s}`: expected three positive numbers C,H,W"),
    }
}
