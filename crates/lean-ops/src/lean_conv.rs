//! The lean convolution: a pointwise 1x1 convolution plus a grouped sparse-stencil convolution
//! of the same input (docs/lean-conv.md), as one fused CPU op with its backward.

use crate::conv::add_channel_bias;
use crate::cost::{Cost, CostModel};
use crate::cpu_op::{CpuOp2, CpuOp3, OnCpu};
use crate::error::{check_float, dims4, shape_err, Result};
use crate::kernels::conv_sum::ConvSum;
use crate::real::{dispatch_dtype, tensor, with_data, Real};
use crate::reference;

use candle_core::{Layout, Module, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

pub use crate::lean_conv_config::LeanConv2dConfig;

/// Checks x, P, Q against the configuration; returns (N, H, W).
fn check_inputs(
    op: &'static str,
    cfg: &LeanConv2dConfig,
    x: &Tensor,
    p: Option<&Tensor>,
    q: &Tensor,
) -> Result<(usize, usize, usize)> {
    cfg.validate()?;
    let (n, c, h, w) = dims4(op, x)?;
    if c != cfg.in_channels {
        return Err(shape_err(
            op,
            format!(
                "input has {c} channels, the layer expects {} (input shape {:?})",
                cfg.in_channels,
                x.dims()
            ),
        ));
    }
    if h == 0 || w == 0 {
        return Err(shape_err(op, format!("input has an empty spatial size {:?}", x.dims())));
    }
    check_weights(op, cfg, x, p, q)?;
    Ok((n, h, w))
}

/// Checks the weights P (if given) and Q, and that x is a float tensor of their dtype.
pub(crate) fn check_weights(
    op: &'static str,
    cfg: &LeanConv2dConfig,
    x: &Tensor,
    p: Option<&Tensor>,
    q: &Tensor,
) -> Result<()> {
    if let Some(p) = p {
        let want = [cfg.out_channels, cfg.in_channels, 1, 1];
        if p.dims() != want {
            return Err(shape_err(
                op,
                format!("pointwise weight must have shape {want:?}, got {:?}", p.dims()),
            ));
        }
    }
    let (a, b, t) = cfg.stencil_shape();
    if q.dims() != [a, b, t] {
        return Err(shape_err(
            op,
            format!(
                "stencil weight must have shape [{a}, {b}, {t}] (Cout, g, |S| of `{}`), got {:?}",
                cfg.stencil,
                q.dims()
            ),
        ));
    }
    check_float(op, x)?;
    for t in p.into_iter().chain([q]) {
        if t.dtype() != x.dtype() {
            return Err(shape_err(
                op,
                format!("weight dtype {:?} differs from input dtype {:?}", t.dtype(), x.dtype()),
            ));
        }
    }
    Ok(())
}

struct LeanOp(ConvSum, Shape);

impl CpuOp3 for LeanOp {
    fn name(&self) -> &'static str {
        "lean-conv2d"
    }
    fn fwd<T: Real>(
        &self,
        s1: &[T],
        _l1: &Layout,
        s2: &[T],
        _l2: &Layout,
        s3: &[T],
        _l3: &Layout,
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let y = self.0.forward(s1, Some(s2), Some(s3));
        Ok((y, self.1.clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        q: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        dispatch_dtype!(self.name(), x.dtype(), |T| {
            with_data::<T, _>(x, |xs| {
                with_data::<T, _>(p, |ps| {
                    with_data::<T, _>(q, |qs| {
                        with_data::<T, _>(gy, |gys| {
                            let g = self.0.backward(xs, Some(ps), Some(qs), gys);
                            let gp = g.dense.map(|v| tensor(v, p.dims())).transpose()?;
                            let gq = g.stencil.map(|v| tensor(v, q.dims())).transpose()?;
                            Ok((Some(tensor(g.x, x.dims())?), gp, gq))
                        })
                    })
                })
            })
        })
    }
}

struct StencilOp(ConvSum, Shape);

impl CpuOp2 for StencilOp {
    fn name(&self) -> &'static str {
        "grouped-stencil-conv2d"
    }
    fn fwd<T: Real>(&self, s1: &[T], _l1: &Layout, s2: &[T], _l2: &Layout) -> candle_core::Result<(Vec<T>, Shape)> {
        let y = self.0.forward(s1, None, Some(s2));
        Ok((y, self.1.clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        q: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        dispatch_dtype!(self.name(), x.dtype(), |T| {
            with_data::<T, _>(x, |xs| {
                with_data::<T, _>(q, |qs| {
                    with_data::<T, _>(gy, |gys| {
                        let g = self.0.backward(xs, None, Some(qs), gys);
                        let gq = g.stencil.map(|v| tensor(v, q.dims())).transpose()?;
                        Ok((Some(tensor(g.x, x.dims())?), gq))
                    })
                })
            })
        })
    }
}

/// The lean convolution y = pointwise(x; P) + grouped_stencil(x; Q) (+ bias).
///
/// `pointwise` is (Cout, Cin, 1, 1), `stencil` is (Cout, g, |S|) with taps in the order of
/// [`Stencil::taps`]. On the CPU (f32/f64) this is one fused kernel; on other devices it runs the
/// composite [`reference::lean_conv2d`].
pub fn lean_conv2d(
    x: &Tensor,
    pointwise: &Tensor,
    stencil: &Tensor,
    bias: Option<&Tensor>,
    cfg: &LeanConv2dConfig,
) -> Result<Tensor> {
    const OP: &str = "lean_conv2d";
    let (n, h, w) = check_inputs(OP, cfg, x, Some(pointwise), stencil)?;
    let y = if x.device().is_cpu() {
        let (ho, wo) = cfg.output_hw(h, w);
        let op = LeanOp(cfg.geometry(n, h, w, true), Shape::from((n, cfg.out_channels, ho, wo)));
        x.contiguous()?
            .apply_op3(&pointwise.contiguous()?, &stencil.contiguous()?, OnCpu(op))?
    } else if x.device().is_cuda() {
        // The 1x1 branch as a cuBLAS matrix product (candle's 1x1 convolution where strided)
        // plus our stencil kernels.
        let pw = match cfg.stride {
            1 => crate::conv::pointwise_matmul(x, pointwise)?,
            s => x.conv2d(pointwise, 0, s, 1, 1)?,
        };
        (pw + stencil_on_device(x, stencil, cfg)?)?
    } else {
        reference::lean_conv2d(x, pointwise, stencil, None, cfg)?
    };
    add_channel_bias(OP, y, bias)
}

/// The grouped sparse-stencil branch alone: y = grouped_stencil(x; Q).
pub fn grouped_stencil_conv2d(x: &Tensor, stencil: &Tensor, cfg: &LeanConv2dConfig) -> Result<Tensor> {
    const OP: &str = "grouped_stencil_conv2d";
    let (n, h, w) = check_inputs(OP, cfg, x, None, stencil)?;
    if x.device().is_cpu() {
        let (ho, wo) = cfg.output_hw(h, w);
        let op = StencilOp(cfg.geometry(n, h, w, false), Shape::from((n, cfg.out_channels, ho, wo)));
        Ok(x.contiguous()?.apply_op2(&stencil.contiguous()?, OnCpu(op))?)
    } else {
        stencil_on_device(x, stencil, cfg)
    }
}

/// The stencil branch on a non-CPU device: our CUDA kernels where built in, else the composite.
fn stencil_on_device(x: &Tensor, stencil: &Tensor, cfg: &LeanConv2dConfig) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64) {
        return crate::cuda::stencil::grouped_stencil_conv2d(x, stencil, cfg);
    }
    reference::grouped_stencil_conv2d(x, stencil, cfg)
}

/// A lean convolution layer, a drop-in for a 3x3 `Conv2d`.
///
/// Parameters (torchvision-style names below the layer's prefix): `pointwise.weight`
/// (Cout, Cin, 1, 1), `stencil.weight` (Cout, g, |S|) and, with bias, `bias` (Cout,).
#[derive(Clone, Debug)]
pub struct LeanConv2d {
    pointwise: Tensor,
    stencil: Tensor,
    bias: Option<Tensor>,
    cfg: LeanConv2dConfig,
}

impl LeanConv2d {
    /// Builds the layer from `vb`. New weights are drawn as `cfg.init` says ([`LeanInit`]: by
    /// default each branch carries half of the Kaiming fan-out output variance 2·Cin/Cout, so
    /// both start with comparable variance and a deep lean network keeps activations of order one).
    pub fn new(cfg: LeanConv2dConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (p_std, q_std) = cfg.init_stds();
        let normal = |stdev| Init::Randn { mean: 0., stdev };
        let pointwise = vb.get_with_hints(
            (cfg.out_channels, cfg.in_channels, 1, 1),
            "pointwise.weight",
            normal(p_std),
        )?;
        let stencil = vb.get_with_hints(cfg.stencil_shape(), "stencil.weight", normal(q_std))?;
        let bias = if cfg.bias {
            Some(vb.get_with_hints(cfg.out_channels, "bias", Init::Const(0.))?)
        } else {
            None
        };
        Ok(LeanConv2d {
            pointwise,
            stencil,
            bias,
            cfg,
        })
    }

    /// Builds the layer from existing weights (e.g. with a BatchNorm folded in); `cfg.bias` is
    /// taken from whether `bias` is given.
    pub fn from_weights(
        cfg: LeanConv2dConfig,
        pointwise: Tensor,
        stencil: Tensor,
        bias: Option<Tensor>,
    ) -> Result<Self> {
        let cfg = cfg.bias(bias.is_some());
        cfg.validate()?;
        let (a, b, t) = cfg.stencil_shape();
        if pointwise.dims() != [cfg.out_channels, cfg.in_channels, 1, 1] || stencil.dims() != [a, b, t] {
            return Err(shape_err(
                "lean_conv2d",
                format!(
                    "weights {:?} and {:?} do not fit {cfg:?}",
                    pointwise.dims(),
                    stencil.dims()
                ),
            ));
        }
        Ok(LeanConv2d {
            pointwise,
            stencil,
            bias,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LeanConv2dConfig {
        &self.cfg
    }
    /// The pointwise weight (Cout, Cin, 1, 1).
    pub fn pointwise_weight(&self) -> &Tensor {
        &self.pointwise
    }
    /// The stencil weight (Cout, g, |S|).
    pub fn stencil_weight(&self) -> &Tensor {
        &self.stencil
    }
    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    /// The equivalent dense 3x3 kernel (Cout, Cin, 3, 3) of the spec's oracle.
    pub fn dense_kernel(&self) -> Result<Tensor> {
        reference::lean_dense_kernel(&self.pointwise, &self.stencil, &self.cfg)
    }
}

impl Module for LeanConv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(lean_conv2d(
            x,
            &self.pointwise,
            &self.stencil,
            self.bias.as_ref(),
            &self.cfg,
        )?)
    }
}

impl CostModel for LeanConv2d {
    fn cost(&self, input: &[usize]) -> Result<(Cost, Vec<usize>)> {
        self.cfg.cost(input)
    }
}
