//! Dense 2-d convolution (groups = 1) as im2col + GEMM with its own backward: several times
//! faster than candle's `conv2d` on CPU, forward and backward (docs/benchmarks.md).

use crate::cost::{Cost, CostModel};
use crate::cpu_op::{CpuOp2, OnCpu};
use crate::error::{check_float, config_err, dims4, shape_err, Result};
use crate::kernels::conv_sum::ConvSum;
use crate::kernels::gemm_conv::ConvGeom;
use crate::kernels::winograd::Winograd;
use crate::real::{dispatch_dtype, tensor, with_data, Real};
use candle_core::{Layout, Module, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

/// Configuration of a dense [`Conv2d`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Square kernel size.
    pub kernel_size: usize,
    /// Stride (>= 1).
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Dilation (>= 1).
    pub dilation: usize,
    /// Whether the layer has a bias.
    pub bias: bool,
}

impl Conv2dConfig {
    /// A `kernel_size` x `kernel_size` convolution, stride 1, no padding, no bias.
    pub fn new(in_channels: usize, out_channels: usize, kernel_size: usize) -> Self {
        Conv2dConfig {
            in_channels,
            out_channels,
            kernel_size,
            stride: 1,
            padding: 0,
            dilation: 1,
            bias: false,
        }
    }
    config_setters! {
        /// Sets the stride.
        stride: usize;
        /// Sets the padding.
        padding: usize;
        /// Sets the dilation.
        dilation: usize;
        /// Turns the bias on or off.
        bias: bool;
    }

    /// Output spatial size for an input of `h` x `w`.
    pub fn output_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let ext = self.dilation * (self.kernel_size - 1) + 1;
        if self.stride == 0 || self.dilation == 0 || self.kernel_size == 0 {
            return Err(config_err(
                "conv2d",
                format!("kernel_size, stride and dilation must be >= 1, got {self:?}"),
            ));
        }
        if h + 2 * self.padding < ext || w + 2 * self.padding < ext {
            return Err(shape_err(
                "conv2d",
                format!(
                    "input {h}x{w} with padding {} is smaller than the kernel extent {ext}",
                    self.padding
                ),
            ));
        }
        Ok((
            (h + 2 * self.padding - ext) / self.stride + 1,
            (w + 2 * self.padding - ext) / self.stride + 1,
        ))
    }
}

impl CostModel for Conv2dConfig {
    fn cost(&self, input: &[usize]) -> Result<(Cost, Vec<usize>)> {
        let &[n, c, h, w] = input else {
            return Err(shape_err(
                "conv2d",
                format!("expected an (N, C, H, W) input shape, got {input:?}"),
            ));
        };
        if c != self.in_channels {
            return Err(shape_err(
                "conv2d",
                format!("expected {} input channels, got {c}", self.in_channels),
            ));
        }
        let (ho, wo) = self.output_hw(h, w)?;
        let k2 = self.kernel_size * self.kernel_size;
        let params = self.out_channels * self.in_channels * k2 + if self.bias { self.out_channels } else { 0 };
        let macs = n * ho * wo * self.out_channels * self.in_channels * k2;
        Ok((
            Cost::new(params as u64, macs as u64),
            vec![n, self.out_channels, ho, wo],
        ))
    }
}

/// The batch's convolution (im2col + GEMM), its Winograd form where that applies (3x3, stride
/// 1, padding 1: 2.25x fewer multiplications), and the output shape.
struct DenseConvOp(ConvSum, Option<Winograd>, Shape);

impl CpuOp2 for DenseConvOp {
    fn name(&self) -> &'static str {
        "lean-conv2d-dense"
    }
    fn fwd<T: Real>(&self, s1: &[T], _l1: &Layout, s2: &[T], _l2: &Layout) -> candle_core::Result<(Vec<T>, Shape)> {
        let y = match &self.1 {
            Some(wg) => wg.forward(s1, s2),
            None => self.0.forward(s1, Some(s2), None),
        };
        Ok((y, self.2.clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        dispatch_dtype!(self.name(), x.dtype(), |T| {
            with_data::<T, _>(x, |xs| {
                with_data::<T, _>(w, |ws| {
                    with_data::<T, _>(gy, |gys| {
                        if let (Some(wg), Some(geom)) = (&self.1, &self.0.dense) {
                            let gx = tensor(wg.backward_input(gys, ws), x.dims())?;
                            let gw = match wg.weight_grad_pays() {
                                true => wg.backward_weight(xs, gys),
                                false => self.0.backward_dense_weight(geom, xs, gys),
                            };
                            return Ok((Some(gx), Some(tensor(gw, w.dims())?)));
                        }
                        let g = self.0.backward(xs, Some(ws), None, gys);
                        let gw = g.dense.map(|v| tensor(v, w.dims())).transpose()?;
                        Ok((Some(tensor(g.x, x.dims())?), gw))
                    })
                })
            })
        })
    }
}

/// A dense 2-d convolution of `x` (N, Cin, H, W) with `weight` (Cout, Cin, k, k), plus an optional
/// bias (Cout,). Uses the fast CPU kernel on the CPU (f32/f64), candle's `conv2d` elsewhere.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    const OP: &str = "conv2d";
    let (n, cin, h, w) = dims4(OP, x)?;
    let (cout, wcin, kh, kw) = dims4(OP, weight)
        .map_err(|_| shape_err(OP, format!("weight must be (Cout, Cin, k, k), got {:?}", weight.dims())))?;
    if wcin != cin {
        return Err(shape_err(
            OP,
            format!("input has {cin} channels but weight {:?} expects {wcin}", weight.dims()),
        ));
    }
    if kh != kw {
        return Err(shape_err(
            OP,
            format!("only square kernels are supported, got weight {:?}", weight.dims()),
        ));
    }
    let cfg = Conv2dConfig {
        in_channels: cin,
        out_channels: cout,
        kernel_size: kh,
        stride,
        padding,
        dilation,
        bias: bias.is_some(),
    };
    let (ho, wo) = cfg.output_hw(h, w)?;
    check_float(OP, x)?;
    let y = if x.device().is_cpu() {
        let geom = ConvGeom {
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            stride,
            pad: padding,
            dil: dilation,
            ho,
            wo,
        };
        let op = DenseConvOp(
            ConvSum {
                n,
                dense: Some(geom),
                stencil: None,
            },
            Winograd::of(&geom, n),
            Shape::from((n, cout, ho, wo)),
        );
        x.contiguous()?.apply_op2(&weight.contiguous()?, OnCpu(op))?
    } else {
        x.conv2d(weight, padding, stride, dilation, 1)?
    };
    add_channel_bias(OP, y, bias)
}

/// A 1x1, stride-1 convolution as one batched matrix product, W (Cout x Cin) · x_n (Cin x HW)
/// for every sample (cuBLAS on CUDA, forward and both gradients). For the lean convolution's
/// branch on a GPU: candle's convolution unfolds even a 1x1 input (im2col) and runs its input
/// gradient as a transposed convolution, together a third of a lean training step's GPU time
/// (docs/benchmarks.md). Plain 1x1 layers keep candle's convolution: MobileNetV2's training
/// step measured slower this way at batch 256 (the weight gradient is summed over the batch
/// from per-sample products).
pub(crate) fn pointwise_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (n, cin, h, w) = x.dims4()?;
    let cout = weight.dim(0)?;
    let y = weight
        .reshape((cout, cin))?
        .broadcast_matmul(&x.contiguous()?.reshape((n, cin, h * w))?)?;
    Ok(y.reshape((n, cout, h, w))?)
}

/// Adds a per-channel bias (C,) to an (N, C, H, W) tensor.
pub(crate) fn add_channel_bias(op: &'static str, y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        None => Ok(y),
        Some(b) => {
            let c = y.dim(1)?;
            if b.dims() != [c] {
                return Err(shape_err(op, format!("bias must have shape [{c}], got {:?}", b.dims())));
            }
            if y.device().is_cpu() {
                // One pass of ours (candle's broadcast add splits onto a second thread pool).
                let ones = Tensor::ones(c, y.dtype(), y.device())?;
                return crate::norm::channel_affine_layout(&y, &ones, b, crate::Activation::None, false);
            }
            Ok(y.broadcast_add(&b.reshape((1, c, 1, 1))?)?)
        }
    }
}

/// A dense convolution layer with torchvision's parameter names (`weight`, `bias`).
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: Conv2dConfig,
}

impl Conv2d {
    /// Builds the layer from `vb`; new weights are Kaiming-normal (fan_out, ReLU gain) as
    /// torchvision initialises ResNet convolutions, biases zero.
    pub fn new(cfg: Conv2dConfig, vb: VarBuilder) -> Result<Self> {
        let k = cfg.kernel_size;
        let fan_out = (cfg.out_channels * k * k) as f64;
        let init = Init::Randn {
            mean: 0.,
            stdev: (2.0 / fan_out).sqrt(),
        };
        let weight = vb.get_with_hints((cfg.out_channels, cfg.in_channels, k, k), "weight", init)?;
        let bias = if cfg.bias {
            Some(vb.get_with_hints(cfg.out_channels, "bias", Init::Const(0.))?)
        } else {
            None
        };
        Ok(Conv2d { weight, bias, cfg })
    }
    /// Builds the layer from existing tensors (weight (Cout, Cin, k, k)).
    pub fn from_weights(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        dilation: usize,
    ) -> Result<Self> {
        let (cout, cin, k, _) = dims4("conv2d", &weight)?;
        let cfg = Conv2dConfig {
            in_channels: cin,
            out_channels: cout,
            kernel_size: k,
            stride,
            padding,
            dilation,
            bias: bias.is_some(),
        };
        Ok(Conv2d { weight, bias, cfg })
    }
    /// The configuration.
    pub fn config(&self) -> &Conv2dConfig {
        &self.cfg
    }
    /// The weight (Cout, Cin, k, k).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let c = &self.cfg;
        Ok(conv2d(
            x,
            &self.weight,
            self.bias.as_ref(),
            c.stride,
            c.padding,
            c.dilation,
        )?)
    }
}

impl CostModel for Conv2d {
    fn cost(&self, input: &[usize]) -> Result<(Cost, Vec<usize>)> {
        self.cfg.cost(input)
    }
}
