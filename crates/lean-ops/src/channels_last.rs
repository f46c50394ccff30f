//! Channels-last (NHWC) operators, for networks that run their inside in NHWC: the layout
//! conversions at the network's edges, the lean, stencil-only, depthwise 3x3, dense 3x3 (few
//! input channels) and pointwise convolutions, ShuffleNetV2's concatenation + channel shuffle, global average pooling, and (through [`crate::BatchNorm2d::forward_act_nhwc`]) BatchNorm with its activation.
//! The convolutions' `_moments` forms also sum their output's per-channel statistics for the
//! BatchNorm that follows them, in their own output pass.
//!
//! A batch in NHWC is a (N·H·W) x C matrix: a 1x1 convolution of the whole batch is one GEMM
//! with M = N·H·W, and a depthwise stencil tap is a multiply-add over a pixel's contiguous
//! channels (docs/benchmarks.md says what this buys). Tensors are shaped (N, H, W, C); weights
//! keep their NCHW (torchvision) shapes, so the same parameters serve both layouts. On the CPU
//! every op is a fused kernel with its backward; on other devices it runs the NCHW composite
//! between two permutes.
//!
//! (Longer than our usual file: each op here is a thin candle `CustomOp` over the kernels in
//! `kernels/nhwc.rs` and `kernels/rows.rs`, kept together so the layout's contract is one page.)

use crate::activation::Activation;
use crate::cpu_op::{CpuOp1, CpuOp2, CpuOp3, OnCpu};
use crate::error::{check_float, check_same_float, config_err, shape_err, Result};
use crate::kernels::nhwc::{transpose_samples, NhwcConv, NhwcStencil};
use crate::kernels::par_new;
use crate::kernels::rows::ROWS;
use crate::lean_conv::{check_weights, LeanConv2dConfig};
use crate::real::{dispatch, dispatch_dtype, slice, tensor, with_data, Real};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

/// Checks a rank-4 (N, H, W, C) input and returns its dims.
pub(crate) fn dims_nhwc(op: &'static str, x: &Tensor) -> Result<(usize, usize, usize, usize)> {
    match x.dims() {
        &[n, h, w, c] if h > 0 && w > 0 => Ok((n, h, w, c)),
        d => Err(shape_err(
            op,
            format!("expected a rank-4 channels-last (N, H, W, C) input with H, W > 0, got shape {d:?}"),
        )),
    }
}

/// NCHW <-> NHWC as one tiled transpose per sample; the backward is the opposite conversion.
struct TransposeOp {
    to_last: bool,
}

impl TransposeOp {
    /// (rows, cols) of each sample's source matrix and the output shape.
    fn plan(&self, d: &[usize]) -> (usize, usize, Shape) {
        if self.to_last {
            (d[1], d[2] * d[3], Shape::from((d[0], d[2], d[3], d[1])))
        } else {
            (d[1] * d[2], d[3], Shape::from((d[0], d[3], d[1], d[2])))
        }
    }
}

impl CpuOp1 for TransposeOp {
    fn name(&self) -> &'static str {
        if self.to_last {
            "to-channels-last"
        } else {
            "to-channels-first"
        }
    }
    fn fwd<T: Real>(&self, s: &[T], l: &Layout) -> candle_core::Result<(Vec<T>, Shape)> {
        let (rows, cols, shape) = self.plan(l.dims());
        let n = l.dims()[0];
        let y = transpose_samples(s, n, rows, cols);
        Ok((y, shape))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, gy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = TransposeOp { to_last: !self.to_last };
        Ok(Some(gy.contiguous()?.apply_op1(OnCpu(back))?))
    }
}

/// (N, C, H, W) -> (N, H, W, C).
pub fn to_channels_last(x: &Tensor) -> Result<Tensor> {
    if x.rank() != 4 {
        return Err(shape_err(
            "to_channels_last",
            format!("expected an (N, C, H, W) input, got {:?}", x.dims()),
        ));
    }
    if x.device().is_cpu() && check_float("to_channels_last", x).is_ok() {
        Ok(x.contiguous()?.apply_op1(OnCpu(TransposeOp { to_last: true }))?)
    } else {
        Ok(x.permute((0, 2, 3, 1))?.contiguous()?)
    }
}

/// (N, H, W, C) -> (N, C, H, W).
pub fn to_channels_first(x: &Tensor) -> Result<Tensor> {
    if x.rank() != 4 {
        return Err(shape_err(
            "to_channels_first",
            format!("expected an (N, H, W, C) input, got {:?}", x.dims()),
        ));
    }
    if x.device().is_cpu() && check_float("to_channels_first", x).is_ok() {
        Ok(x.contiguous()?.apply_op1(OnCpu(TransposeOp { to_last: false }))?)
    } else {
        Ok(x.permute((0, 3, 1, 2))?.contiguous()?)
    }
}

/// Moments asked of a channels-last convolution: the shift to sum around, and where the op's
/// forward leaves (mean, variance) (the op itself moves into candle's graph).
#[derive(Clone)]
struct MomentsRequest {
    shift: Vec<f64>,
    out: Arc<OnceLock<(Vec<f64>, Vec<f64>)>>,
}

impl MomentsRequest {
    fn new(shift: &[f64]) -> Self {
        MomentsRequest {
            shift: shift.to_vec(),
            out: Arc::default(),
        }
    }

    /// The forward of `geom` with moments if asked for, leaving them in `out`.
    fn forward<T: Real>(req: Option<&Self>, geom: &NhwcConv, x: &[T], p: Option<&[T]>, q: Option<&[T]>) -> Vec<T> {
        match req {
            None => geom.forward(x, p, q, None, Default::default()),
            Some(r) => {
                let (y, m) = geom.forward_moments(x, p, q, Some(r.shift.clone()));
                if let Some(m) = m {
                    let _ = r.out.set(m);
                }
                y
            }
        }
    }

    /// The moments the forward left (the op keeps its own handle for the backward graph).
    fn take(self) -> Option<ChannelMoments> {
        self.out.get().map(|(mean, var)| ChannelMoments {
            mean: mean.clone(),
            var: var.clone(),
        })
    }
}

/// The per-channel mean and biased variance of a convolution's output, summed in its own
/// output pass for the BatchNorm after it ([`crate::BatchNorm2d::forward_nhwc_with`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelMoments {
    /// Per channel, the mean.
    pub mean: Vec<f64>,
    /// Per channel, the biased (population) variance.
    pub var: Vec<f64>,
}

struct NhwcLeanOp(NhwcConv, Shape, Option<MomentsRequest>);

impl CpuOp3 for NhwcLeanOp {
    fn name(&self) -> &'static str {
        "lean-conv2d-nhwc"
    }
    fn fwd<T: Real>(
        &self,
        x: &[T],
        _l1: &Layout,
        p: &[T],
        _l2: &Layout,
        q: &[T],
        _l3: &Layout,
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let y = MomentsRequest::forward(self.2.as_ref(), &self.0, x, Some(p), Some(q));
        Ok((y, self.1.clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        q: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        dispatch_dtype!(self.name(), x.dtype(), |T| {
            with_data::<T, _>(x, |xs| {
                with_data::<T, _>(p, |ps| {
                    with_data::<T, _>(q, |qs| {
                        with_data::<T, _>(gy, |gys| {
                            let g = self.0.backward(xs, Some(ps), Some(qs), gys, x.track_op());
                            let gx = g.x.map(|v| tensor(v, x.dims())).transpose()?;
                            let gp = g.pointwise.map(|v| tensor(v, p.dims())).transpose()?;
                            let gq = g.stencil.map(|v| tensor(v, q.dims())).transpose()?;
                            Ok((gx, gp, gq))
                        })
                    })
                })
            })
        })
    }
}

/// A one-branch NHWC convolution on (x, weight): the pointwise branch (weight (Cout, Cin, 1, 1))
/// when the geometry has it, else the stencil branch (weight (Cout, g, |S|)).
struct NhwcOneBranchOp(NhwcConv, Shape, Option<MomentsRequest>);

impl NhwcOneBranchOp {
    /// (P, Q) for the kernel: `w` in the slot of the geometry's branch.
    fn weights<'a, T>(&self, w: &'a [T]) -> (Option<&'a [T]>, Option<&'a [T]>) {
        if self.0.pointwise {
            (Some(w), None)
        } else {
            (None, Some(w))
        }
    }
}

impl CpuOp2 for NhwcOneBranchOp {
    fn name(&self) -> &'static str {
        if self.0.pointwise {
            "pointwise-conv2d-nhwc"
        } else {
            "grouped-stencil-conv2d-nhwc"
        }
    }
    fn fwd<T: Real>(&self, s1: &[T], _l1: &Layout, s2: &[T], _l2: &Layout) -> candle_core::Result<(Vec<T>, Shape)> {
        let (p, q) = self.weights(s2);
        let y = MomentsRequest::forward(self.2.as_ref(), &self.0, s1, p, q);
        Ok((y, self.1.clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        dispatch_dtype!(self.name(), x.dtype(), |T| {
            with_data::<T, _>(x, |xs| {
                with_data::<T, _>(w, |ws| {
                    with_data::<T, _>(gy, |gys| {
                        let (p, q) = self.weights(ws);
                        // An input that tracks no op (a network's input) needs no gradient.
                        let g = self.0.backward(xs, p, q, gys, x.track_op());
                        let gx = g.x.map(|v| tensor(v, x.dims())).transpose()?;
                        let gw = g.pointwise.or(g.stencil).map(|v| tensor(v, w.dims())).transpose()?;
                        Ok((gx, gw))
                    })
                })
            })
        })
    }
}

/// Adds a per-channel bias (C,) to a channels-last tensor (one pass of our kernel; candle's
/// broadcast add is several times slower here).
fn add_last_dim_bias(op: &'static str, y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        None => Ok(y),
        Some(b) => {
            let c = y.dim(3)?;
            if b.dims() != [c] {
                return Err(shape_err(op, format!("bias must have shape [{c}], got {:?}", b.dims())));
            }
            channel_affine_nhwc(&y, &Tensor::ones(c, y.dtype(), y.device())?, b, Activation::None)
        }
    }
}

/// y = act(x · scale[c] + shift[c]) over a channels-last x (..., C): a folded BatchNorm, or a
/// bias and the activation after it, in one pass with its backward.
pub fn channel_affine_nhwc(x: &Tensor, scale: &Tensor, shift: &Tensor, act: Activation) -> Result<Tensor> {
    crate::norm::channel_affine_layout(x, scale, shift, act, true)
}

/// The geometry of `cfg` on an (n, h, w, Cin) input, with or without the pointwise branch.
pub(crate) fn geometry(cfg: &LeanConv2dConfig, n: usize, h: usize, w: usize, pointwise: bool) -> NhwcConv {
    let (ho, wo) = cfg.output_hw(h, w);
    NhwcConv {
        n,
        h,
        w,
        cin: cfg.in_channels,
        cout: cfg.out_channels,
        stride: cfg.stride,
        ho,
        wo,
        pointwise,
        stencil: Some(NhwcStencil {
            g: cfg.group_size,
            dil: cfg.dilation,
            taps: cfg.stencil.taps(),
        }),
    }
}

/// Checks a channels-last input against `cfg` and the weights; returns (N, H, W).
pub(crate) fn check_lean_input(
    op: &'static str,
    cfg: &LeanConv2dConfig,
    x: &Tensor,
    p: Option<&Tensor>,
    q: &Tensor,
) -> Result<(usize, usize, usize)> {
    cfg.validate()?;
    let (n, h, w, c) = dims_nhwc(op, x)?;
    if c != cfg.in_channels {
        return Err(shape_err(
            op,
            format!(
                "input has {c} channels (last dim), the layer expects {} (input shape {:?})",
                cfg.in_channels,
                x.dims()
            ),
        ));
    }
    check_weights(op, cfg, x, p, q)?;
    Ok((n, h, w))
}

/// The grouped stencil branch alone on a channels-last input (see
/// [`crate::grouped_stencil_conv2d`]): (N, H, W, Cin) -> (N, Ho, Wo, Cout).
pub fn grouped_stencil_conv2d_nhwc(x: &Tensor, stencil: &Tensor, cfg: &LeanConv2dConfig) -> Result<Tensor> {
    grouped_stencil_nhwc(x, stencil, cfg, None)
}

fn grouped_stencil_nhwc(
    x: &Tensor,
    stencil: &Tensor,
    cfg: &LeanConv2dConfig,
    req: Option<MomentsRequest>,
) -> Result<Tensor> {
    const OP: &str = "grouped_stencil_conv2d_nhwc";
    let (n, h, w) = check_lean_input(OP, cfg, x, None, stencil)?;
    if x.device().is_cpu() {
        let geom = geometry(cfg, n, h, w, false);
        let shape = Shape::from((n, geom.ho, geom.wo, cfg.out_channels));
        Ok(x.contiguous()?
            .apply_op2(&stencil.contiguous()?, OnCpu(NhwcOneBranchOp(geom, shape, req)))?)
    } else {
        to_channels_last(&crate::grouped_stencil_conv2d(&to_channels_first(x)?, stencil, cfg)?)
    }
}

/// A depthwise 3x3 convolution of a channels-last input (see [`crate::depthwise_conv2d`]):
/// weight (C·m, 1, 3, 3), padding = dilation.
pub fn depthwise_conv2d_nhwc(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    const OP: &str = "depthwise_conv2d_nhwc";
    let y = conv3x3_nhwc(OP, x, (weight, stride, dilation), crate::depthwise::as_stencil, None)?;
    add_last_dim_bias(OP, y, bias)
}

/// [`depthwise_conv2d_nhwc`] without bias, with its output's per-channel moments summed
/// around `shift` in the op's own output pass (see [`lean_conv2d_nhwc_moments`]).
pub fn depthwise_conv2d_nhwc_moments(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    dilation: usize,
    shift: &[f64],
) -> Result<(Tensor, Option<ChannelMoments>)> {
    let req = MomentsRequest::new(shift);
    let w = (weight, stride, dilation);
    let y = conv3x3_nhwc(
        "depthwise_conv2d_nhwc",
        x,
        w,
        crate::depthwise::as_stencil,
        Some(req.clone()),
    )?;
    Ok((y, req.take()))
}

/// A dense 3x3 convolution (groups 1, padding = dilation) of a channels-last input, weight
/// (Cout, Cin, 3, 3) as [`crate::conv2d`] takes it: run as the `full` stencil with one group, a
/// direct kernel meant for few input channels (a network's first layer), where an unfolded GEMM
/// would have K = 9·Cin.
pub fn dense3x3_conv2d_nhwc(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    const OP: &str = "dense3x3_conv2d_nhwc";
    let y = conv3x3_nhwc(
        OP,
        x,
        (weight, stride, dilation),
        crate::depthwise::dense3x3_as_stencil,
        None,
    )?;
    add_last_dim_bias(OP, y, bias)
}

/// [`dense3x3_conv2d_nhwc`] without bias, with its output's per-channel moments summed around
/// `shift` in the op's own output pass (see [`lean_conv2d_nhwc_moments`]).
pub fn dense3x3_conv2d_nhwc_moments(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    dilation: usize,
    shift: &[f64],
) -> Result<(Tensor, Option<ChannelMoments>)> {
    let req = MomentsRequest::new(shift);
    let w = (weight, stride, dilation);
    let as_stencil = crate::depthwise::dense3x3_as_stencil;
    let y = conv3x3_nhwc("dense3x3_conv2d_nhwc", x, w, as_stencil, Some(req.clone()))?;
    Ok((y, req.take()))
}

/// How a 3x3 convolution's weight becomes a stencil's: (op, input channels, weight, stride,
/// dilation) -> (configuration, stencil weight).
type AsStencil = fn(&'static str, usize, &Tensor, usize, usize) -> Result<(LeanConv2dConfig, Tensor)>;

/// A 3x3 convolution (weight, stride, dilation) of a channels-last input through the stencil
/// kernels, seen as a stencil by `as_stencil`.
fn conv3x3_nhwc(
    op: &'static str,
    x: &Tensor,
    (weight, stride, dilation): (&Tensor, usize, usize),
    as_stencil: AsStencil,
    req: Option<MomentsRequest>,
) -> Result<Tensor> {
    let (_, _, _, c) = dims_nhwc(op, x)?;
    let (cfg, q) = as_stencil(op, c, weight, stride, dilation)?;
    grouped_stencil_nhwc(x, &q, &cfg, req)
}

/// The lean convolution of a channels-last input (N, H, W, Cin) -> (N, Ho, Wo, Cout), with the
/// weights of [`crate::lean_conv2d`] (pointwise (Cout, Cin, 1, 1), stencil (Cout, g, |S|)).
pub fn lean_conv2d_nhwc(
    x: &Tensor,
    pointwise: &Tensor,
    stencil: &Tensor,
    bias: Option<&Tensor>,
    cfg: &LeanConv2dConfig,
) -> Result<Tensor> {
    let y = lean_nhwc(x, pointwise, stencil, cfg, None)?;
    add_last_dim_bias("lean_conv2d_nhwc", y, bias)
}

/// [`lean_conv2d_nhwc`] without bias, with its output's per-channel mean and variance summed
/// around `shift` (one value per output channel: a BatchNorm's running mean, near the batch
/// mean) by the op's row tasks while their rows are in cache: the statistics a BatchNorm after
/// it needs, without its pass over the output. The moments are `None` where the op does not
/// take them (an output too small for row tasks, a device other than the CPU).
pub fn lean_conv2d_nhwc_moments(
    x: &Tensor,
    pointwise: &Tensor,
    stencil: &Tensor,
    cfg: &LeanConv2dConfig,
    shift: &[f64],
) -> Result<(Tensor, Option<ChannelMoments>)> {
    let req = MomentsRequest::new(shift);
    let y = lean_nhwc(x, pointwise, stencil, cfg, Some(req.clone()))?;
    Ok((y, req.take()))
}

fn lean_nhwc(
    x: &Tensor,
    pointwise: &Tensor,
    stencil: &Tensor,
    cfg: &LeanConv2dConfig,
    req: Option<MomentsRequest>,
) -> Result<Tensor> {
    const OP: &str = "lean_conv2d_nhwc";
    let (n, h, w) = check_lean_input(OP, cfg, x, Some(pointwise), stencil)?;
    if x.device().is_cpu() {
        let geom = geometry(cfg, n, h, w, true);
        let op = NhwcLeanOp(geom.clone(), Shape::from((n, geom.ho, geom.wo, cfg.out_channels)), req);
        Ok(x.contiguous()?
            .apply_op3(&pointwise.contiguous()?, &stencil.contiguous()?, OnCpu(op))?)
    } else {
        let y = crate::lean_conv2d(&to_channels_first(x)?, pointwise, stencil, None, cfg)?;
        to_channels_last(&y)
    }
}

/// A 1x1 convolution of a channels-last input (N, H, W, Cin) -> (N, Ho, Wo, Cout) with weight
/// (Cout, Cin, 1, 1), stride `stride`, no padding.
pub fn pointwise_conv2d_nhwc(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize) -> Result<Tensor> {
    let y = pointwise_nhwc(x, weight, stride, None)?;
    add_last_dim_bias("pointwise_conv2d_nhwc", y, bias)
}

/// [`pointwise_conv2d_nhwc`] without bias, with its output's per-channel moments summed
/// around `shift` in the op's own output pass (see [`lean_conv2d_nhwc_moments`]).
pub fn pointwise_conv2d_nhwc_moments(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    shift: &[f64],
) -> Result<(Tensor, Option<ChannelMoments>)> {
    let req = MomentsRequest::new(shift);
    let y = pointwise_nhwc(x, weight, stride, Some(req.clone()))?;
    Ok((y, req.take()))
}

fn pointwise_nhwc(x: &Tensor, weight: &Tensor, stride: usize, req: Option<MomentsRequest>) -> Result<Tensor> {
    const OP: &str = "pointwise_conv2d_nhwc";
    let geom = pointwise_geometry(OP, x, weight, stride)?;
    let (n, ho, wo, cout) = (geom.n, geom.ho, geom.wo, geom.cout);
    if x.device().is_cpu() {
        Ok(x.contiguous()?.apply_op2(
            &weight.contiguous()?,
            OnCpu(NhwcOneBranchOp(geom, Shape::from((n, ho, wo, cout)), req)),
        )?)
    } else {
        to_channels_last(&to_channels_first(x)?.conv2d(weight, 0, stride, 1, 1)?)
    }
}

/// Checks a channels-last input and a (Cout, Cin, 1, 1) weight; returns the geometry of the
/// unpadded strided 1x1 convolution.
pub(crate) fn pointwise_geometry(op: &'static str, x: &Tensor, weight: &Tensor, stride: usize) -> Result<NhwcConv> {
    let (n, h, w, c) = dims_nhwc(op, x)?;
    let (cout, cin) = match weight.dims() {
        &[o, i, 1, 1] => (o, i),
        d => {
            return Err(shape_err(
                op,
                format!("weight must have shape (Cout, Cin, 1, 1), got {d:?}"),
            ))
        }
    };
    if c != cin {
        return Err(shape_err(
            op,
            format!("input has {c} channels (last dim), the weight expects {cin}"),
        ));
    }
    if stride == 0 {
        return Err(config_err(op, "stride must be >= 1, got 0"));
    }
    check_float(op, x)?;
    if weight.dtype() != x.dtype() {
        return Err(shape_err(
            op,
            format!(
                "weight dtype {:?} differs from input dtype {:?}",
                weight.dtype(),
                x.dtype()
            ),
        ));
    }
    Ok(NhwcConv::pointwise_only(n, h, w, cin, cout, stride))
}

/// Interleaves the channels of two equally shaped channels-last tensors: out[.., 2j] = a[.., j],
/// out[.., 2j + 1] = b[.., j]; the backward splits the gradient the same way. `a` may be a
/// channel slice of a larger channels-last tensor (ShuffleNetV2's pass-through half): it is read
/// in place through its pixel stride, not copied first.
struct InterleaveOp;

/// (first value, values from one pixel to the next) of a rank-4 layout whose pixels each hold
/// their channels contiguously at a uniform stride (a contiguous tensor, or a slice of one
/// along the channels); `None` for any other layout.
fn pixel_strided(l: &Layout) -> Option<(usize, usize)> {
    let (d, st) = (l.dims(), l.stride());
    let [_, h, w, c] = *d else { return None };
    let p = st[2];
    let uniform = (c <= 1 || st[3] == 1) && p >= c && (h <= 1 || st[1] == w * p) && (d[0] <= 1 || st[0] == h * w * p);
    uniform.then_some((l.start_offset(), p))
}

impl CustomOp2 for InterleaveOp {
    fn name(&self) -> &'static str {
        "concat-shuffle-nhwc"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = l1.dims();
        let c = d[3];
        let shape = Shape::from((d[0], d[1], d[2], 2 * c));
        let Some((start, ps)) = pixel_strided(l1) else {
            candle_core::bail!("concat-shuffle-nhwc: first input not pixel-strided (internal error)")
        };
        dispatch!(self.name(), s1, |T| {
            let (a, b) = (s1.as_slice::<T>()?, slice::<T>(s2, l2)?);
            let pixels = b.len() / c.max(1);
            if c > 0 && (pixels == 0 || start + (pixels - 1) * ps + c > a.len()) {
                candle_core::bail!("concat-shuffle-nhwc: first input out of its storage (internal error)")
            }
            // Every value written: each task's chunk is whole pixels, each gets both halves.
            let y = par_new(2 * b.len(), 2 * c * ROWS, |first, out| {
                let p0 = first / (2 * c);
                for (i, (o, v)) in out.chunks_exact_mut(2 * c).zip(b[p0 * c..].chunks_exact(c)).enumerate() {
                    let u = &a[start + (p0 + i) * ps..][..c];
                    for ((o, u), v) in o.chunks_exact_mut(2).zip(u).zip(v) {
                        o[0].write(*u);
                        o[1].write(*v);
                    }
                }
            });
            Ok((candle_core::WithDType::to_cpu_storage_owned(y), shape))
        })
    }
    fn bwd(
        &self,
        a: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let c = a.dim(3)?;
        dispatch_dtype!(self.name(), a.dtype(), |T| {
            with_data::<T, _>(gy, |g| {
                let (mut ga, mut gb) = (vec![0 as T; g.len() / 2], vec![0 as T; g.len() / 2]);
                ga.par_chunks_mut(c * ROWS)
                    .zip(gb.par_chunks_mut(c * ROWS).zip(g.par_chunks(2 * c * ROWS)))
                    .for_each(|(ga, (gb, g))| {
                        for ((u, v), o) in ga.iter_mut().zip(gb.iter_mut()).zip(g.chunks_exact(2)) {
                            *u = o[0];
                            *v = o[1];
                        }
                    });
                Ok((Some(tensor(ga, a.dims())?), Some(tensor(gb, a.dims())?)))
            })
        })
    }
}

/// ShuffleNetV2's concatenation of two branches followed by a channel shuffle of 2 groups,
/// on channels-last tensors, in one pass: `channel_shuffle(cat([a, b], C), 2)` for (N, H, W, C)
/// inputs of equal shape. `a` may be a channel slice (`narrow` on the last dimension) of a
/// contiguous tensor; it is read in place.
pub fn concat_shuffle_nhwc(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "concat_shuffle_nhwc";
    dims_nhwc(OP, a)?;
    check_same_float(OP, a, b)?;
    if a.device().is_cpu() {
        let a = if pixel_strided(a.layout()).is_some() {
            a.clone()
        } else {
            a.contiguous()?
        };
        Ok(a.apply_op2(&b.contiguous()?, InterleaveOp)?)
    } else {
        let (n, h, w, c) = a.dims4()?;
        Ok(Tensor::stack(&[a, b], 4)?.reshape((n, h, w, 2 * c))?)
    }
}

/// Global average pooling of a channels-last input: (N, H, W, C) -> (N, C).
pub fn global_avg_pool_nhwc(x: &Tensor) -> Result<Tensor> {
    let (n, h, w, c) = dims_nhwc("global_avg_pool_nhwc", x)?;
    if x.device().is_cpu() && check_float("global_avg_pool_nhwc", x).is_ok() {
        return Ok(x.contiguous()?.apply_op1(OnCpu(GlobalAvgPoolOp))?);
    }
    Ok(x.reshape((n, h * w, c))?.mean(1)?)
}

/// [`global_avg_pool_nhwc`] on the CPU: each sample's pixel rows summed in order along their
/// contiguous channels (candle's `mean` over the pixel dimension reduces with a stride of C
/// values, a few times slower on the late stages' 4 x 4 x 1280 maps), then divided by H·W as
/// `mean` does. The backward spreads gy / (H·W) over the pixels.
struct GlobalAvgPoolOp;

impl CpuOp1 for GlobalAvgPoolOp {
    fn name(&self) -> &'static str {
        "global_avg_pool_nhwc"
    }
    fn fwd<T: Real>(&self, s: &[T], l: &Layout) -> candle_core::Result<(Vec<T>, Shape)> {
        let &[n, h, w, c] = l.dims() else {
            candle_core::bail!("global_avg_pool_nhwc: expected a rank-4 input, got {:?}", l.dims())
        };
        let hw = h * w;
        let count = T::from_f64(hw as f64);
        // Every value written: each task is one sample's C channels.
        let y = par_new(n * c, c.max(1), |i, out| {
            let sample = &s[i / c.max(1) * hw * c..][..hw * c];
            let mut acc = vec![T::zero(); c];
            for row in sample.chunks_exact(c.max(1)) {
                acc.iter_mut().zip(row).for_each(|(a, v)| *a += *v);
            }
            for (o, a) in out.iter_mut().zip(acc) {
                o.write(a / count);
            }
        });
        Ok((y, Shape::from((n, c))))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, gy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, h, w, c) = x.dims4()?;
        let g = (gy / (h * w) as f64)?.reshape((n, 1, c))?;
        Ok(Some(
            g.broadcast_as((n, h * w, c))?.contiguous()?.reshape((n, h, w, c))?,
        ))
    }
}
