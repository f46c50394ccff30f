//! Depthwise 3x3 convolution (MobileNetV2, ShuffleNetV2) through the grouped-stencil kernel:
//! a depthwise 3x3 is the `full` stencil with group size 1, so it never touches candle's
//! per-group `conv2d(groups > 1)` loop.

use crate::conv::add_channel_bias;
use crate::cost::{Cost, CostModel};
use crate::error::{config_err, dims4, shape_err, Result};
use crate::lean_conv::{grouped_stencil_conv2d, LeanConv2dConfig};
use crate::stencil::Stencil;
use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

/// A depthwise 3x3 convolution of (N, C, H, W) with `weight` (C·m, 1, 3, 3) (torchvision's
/// layout, channel multiplier m), padding = dilation, and an optional bias (C·m,).
pub fn depthwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    const OP: &str = "depthwise_conv2d";
    let (_, c, _, _) = dims4(OP, x)?;
    let (cfg, q) = as_stencil(OP, c, weight, stride, dilation)?;
    let y = grouped_stencil_conv2d(x, &q, &cfg)?;
    add_channel_bias(OP, y, bias)
}

/// A depthwise 3x3 of `c` input channels as the `full` stencil with group size 1: its
/// configuration and the weight (C·m, 1, 3, 3) seen as the stencil weight (C·m, 1, 9).
pub(crate) fn as_stencil(
    op: &'static str,
    c: usize,
    weight: &Tensor,
    stride: usize,
    dilation: usize,
) -> Result<(LeanConv2dConfig, Tensor)> {
    conv3x3_as_stencil(op, c, weight, stride, dilation, false)
}

/// A dense 3x3 convolution (groups 1) of `c` input channels as the `full` stencil with one
/// group of all `c` channels: its configuration and the weight (Cout, C, 3, 3) seen as the
/// stencil weight (Cout, C, 9). The channels-last path runs a network's first convolution (3
/// input channels) this way, as a direct stencil instead of an unfolded GEMM.
pub(crate) fn dense3x3_as_stencil(
    op: &'static str,
    c: usize,
    weight: &Tensor,
    stride: usize,
    dilation: usize,
) -> Result<(LeanConv2dConfig, Tensor)> {
    conv3x3_as_stencil(op, c, weight, stride, dilation, true)
}

/// [`as_stencil`] (depthwise) or [`dense3x3_as_stencil`] (`dense`).
fn conv3x3_as_stencil(
    op: &'static str,
    c: usize,
    weight: &Tensor,
    stride: usize,
    dilation: usize,
    dense: bool,
) -> Result<(LeanConv2dConfig, Tensor)> {
    let cout = match (weight.dims(), dense) {
        (&[o, 1, 3, 3], false) if c > 0 && o % c == 0 => o,
        (&[o, i, 3, 3], true) if c > 0 && i == c => o,
        (d, _) => {
            let want = if dense {
                format!("(Cout, {c}, 3, 3)")
            } else {
                "(C·m, 1, 3, 3)".to_string()
            };
            return Err(shape_err(
                op,
                format!("weight must be {want} for {c} input channels, got {d:?}"),
            ));
        }
    };
    let g = if dense { c } else { 1 };
    let cfg = LeanConv2dConfig::new(c, cout)
        .stencil(Stencil::Full)
        .group_size(g)
        .stride(stride)
        .dilation(dilation);
    Ok((cfg, weight.reshape((cout, g, 9))?))
}

/// A depthwise 3x3 convolution layer with torchvision's names (`weight` (C·m, 1, 3, 3), `bias`).
#[derive(Clone, Debug)]
pub struct DepthwiseConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    dilation: usize,
}

impl DepthwiseConv2d {
    /// Builds a `channels -> channels·multiplier` depthwise 3x3 layer (padding = dilation).
    /// New weights are Kaiming-normal over torchvision's fan-out (C·m·9).
    pub fn new(
        channels: usize,
        multiplier: usize,
        stride: usize,
        dilation: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        if channels == 0 || multiplier == 0 || stride == 0 || dilation == 0 {
            return Err(config_err(
                "depthwise_conv2d",
                format!("channels, multiplier, stride and dilation must be >= 1, got {channels}, {multiplier}, {stride}, {dilation}"),
            ));
        }
        let cout = channels * multiplier;
        let init = Init::Randn {
            mean: 0.,
            stdev: (2.0 / (cout * 9) as f64).sqrt(),
        };
        let weight = vb.get_with_hints((cout, 1, 3, 3), "weight", init)?;
        let bias = if bias {
            Some(vb.get_with_hints(cout, "bias", Init::Const(0.))?)
        } else {
            None
        };
        Ok(DepthwiseConv2d {
            weight,
            bias,
            stride,
            dilation,
        })
    }
    /// Builds the layer from existing tensors.
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>, stride: usize, dilation: usize) -> Self {
        DepthwiseConv2d {
            weight,
            bias,
            stride,
            dilation,
        }
    }
    /// The weight (C·m, 1, 3, 3).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    /// The stride.
    pub fn stride(&self) -> usize {
        self.stride
    }
    /// The dilation (= padding).
    pub fn dilation(&self) -> usize {
        self.dilation
    }
}

impl Module for DepthwiseConv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(depthwise_conv2d(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.dilation,
        )?)
    }
}

impl CostModel for DepthwiseConv2d {
    fn cost(&self, input: &[usize]) -> Result<(Cost, Vec<usize>)> {
        let &[n, c, h, w] = input else {
            return Err(shape_err(
                "depthwise_conv2d",
                format!("expected an (N, C, H, W) input shape, got {input:?}"),
            ));
        };
        let cout = self.weight.dim(0)?;
        if cout % c.max(1) != 0 {
            return Err(shape_err(
                "depthwise_conv2d",
                format!("{c} input channels do not divide {cout} outputs"),
            ));
        }
        let (ho, wo) = ((h.max(1) - 1) / self.stride + 1, (w.max(1) - 1) / self.stride + 1);
        let params = cout * 9 + self.bias.as_ref().map_or(0, |_| cout);
        Ok((
            Cost::new(params as u64, (n * ho * wo * cout * 9) as u64),
            vec![n, cout, ho, wo],
        ))
    }
}
