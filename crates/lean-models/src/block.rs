//! The ResNet basic block (two 3x3 convolutions and a shortcut), dense or lean.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use lean_ops::{
    activation, Activation, BatchNorm2d, BatchNormConfig, Conv2d, Conv2dConfig, Cost, CostModel, LeanConv2d,
    LeanConv2dConfig, Stencil,
};

/// How a block's 3x3 convolutions are built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conv3x3Kind {
    /// A dense 3x3 convolution (torchvision's ResNet).
    Dense,
    /// A lean convolution with the given knobs (LEAN_SPEC.md section 2).
    Lean {
        /// The stencil of the grouped branch.
        stencil: Stencil,
        /// Input channels per group (1 = depthwise).
        group_size: usize,
        /// Keep the strided (downsampling) 3x3 convolutions dense.
        dense_downsample: bool,
    },
}

impl Conv3x3Kind {
    /// The default lean knobs: five-point stencil, depthwise, lean downsampling.
    pub fn lean() -> Self {
        Conv3x3Kind::Lean {
            stencil: Stencil::Five,
            group_size: 1,
            dense_downsample: false,
        }
    }
}

/// A 3x3 convolution of either kind, padding 1.
#[derive(Clone, Debug)]
pub enum Conv3x3 {
    /// Dense.
    Dense(Conv2d),
    /// Lean.
    Lean(LeanConv2d),
}

impl Conv3x3 {
    /// Builds a `cin -> cout` 3x3 convolution with `stride`, named as torchvision names it.
    pub fn new(kind: Conv3x3Kind, cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> lean_ops::Result<Self> {
        match kind {
            Conv3x3Kind::Lean {
                stencil,
                group_size,
                dense_downsample,
            } if !(dense_downsample && stride > 1) => {
                let cfg = LeanConv2dConfig::new(cin, cout)
                    .stencil(stencil)
                    .group_size(group_size)
                    .stride(stride);
                Ok(Conv3x3::Lean(LeanConv2d::new(cfg, vb)?))
            }
            _ => Ok(Conv3x3::Dense(Conv2d::new(
                Conv2dConfig::new(cin, cout, 3).stride(stride).padding(1),
                vb,
            )?)),
        }
    }
}

impl Module for Conv3x3 {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Conv3x3::Dense(c) => c.forward(x),
            Conv3x3::Lean(c) => c.forward(x),
        }
    }
}

impl CostModel for Conv3x3 {
    fn cost(&self, input: &[usize]) -> lean_ops::Result<(Cost, Vec<usize>)> {
        match self {
            Conv3x3::Dense(c) => c.cost(input),
            Conv3x3::Lean(c) => c.cost(input),
        }
    }
}

/// Configuration of a [`BasicBlock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Input channels.
    pub in_planes: usize,
    /// Output channels.
    pub planes: usize,
    /// Stride of the first convolution (and of the shortcut projection).
    pub stride: usize,
    /// Dense or lean 3x3 convolutions.
    pub conv: Conv3x3Kind,
}

impl BlockConfig {
    /// A dense block `in_planes -> planes` with `stride`.
    pub fn new(in_planes: usize, planes: usize, stride: usize) -> Self {
        BlockConfig {
            in_planes,
            planes,
            stride,
            conv: Conv3x3Kind::Dense,
        }
    }
    /// Sets the kind of the 3x3 convolutions.
    pub fn conv(mut self, kind: Conv3x3Kind) -> Self {
        self.conv = kind;
        self
    }
}

/// ResNet's basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), with a 1x1
/// projection + BatchNorm shortcut (`downsample.0`, `downsample.1`) where the shape changes.
#[derive(Debug)]
pub struct BasicBlock {
    conv1: Conv3x3,
    bn1: BatchNorm2d,
    conv2: Conv3x3,
    bn2: BatchNorm2d,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl BasicBlock {
    /// Builds the block from `vb` with torchvision's names.
    pub fn new(cfg: &BlockConfig, vb: VarBuilder) -> lean_ops::Result<Self> {
        let bn = BatchNormConfig::default();
        let conv1 = Conv3x3::new(cfg.conv, cfg.in_planes, cfg.planes, cfg.stride, vb.pp("conv1"))?;
        let bn1 = BatchNorm2d::new(cfg.planes, bn, vb.pp("bn1"))?;
        let conv2 = Conv3x3::new(cfg.conv, cfg.planes, cfg.planes, 1, vb.pp("conv2"))?;
        let bn2 = BatchNorm2d::new(cfg.planes, bn, vb.pp("bn2"))?;
        let downsample = if cfg.stride != 1 || cfg.in_planes != cfg.planes {
            let c = Conv2d::new(
                Conv2dConfig::new(cfg.in_planes, cfg.planes, 1).stride(cfg.stride),
                vb.pp("downsample.0"),
            )?;
            Some((c, BatchNorm2d::new(cfg.planes, bn, vb.pp("downsample.1"))?))
        } else {
            None
        };
        Ok(BasicBlock {
            conv1,
            bn1,
            conv2,
            bn2,
            downsample,
        })
    }

    /// The block in train (batch statistics) or eval mode.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> lean_ops::Result<Tensor> {
        let h = self.bn1.forward_act(&self.conv1.forward(x)?, train, Activation::Relu)?;
        let h = self
            .bn2
            .forward_act(&self.conv2.forward(&h)?, train, Activation::None)?;
        let shortcut = match &self.downsample {
            Some((c, bn)) => bn.forward_act(&c.forward(x)?, train, Activation::None)?,
            None => x.clone(),
        };
        activation(&(h + shortcut)?, Activation::Relu)
    }
}

impl CostModel for BasicBlock {
    fn cost(&self, input: &[usize]) -> lean_ops::Result<(Cost, Vec<usize>)> {
        let (c1, s1) = self.conv1.cost(input)?;
        let (b1, _) = self.bn1.cost(&s1)?;
        let (c2, s2) = self.conv2.cost(&s1)?;
        let (b2, _) = self.bn2.cost(&s2)?;
        let mut total = c1 + b1 + c2 + b2;
        if let Some((c, bn)) = &self.downsample {
            let (cd, sd) = c.cost(input)?;
            total += cd + bn.cost(&sd)?.0;
        }
        Ok((total, s2))
    }
}
