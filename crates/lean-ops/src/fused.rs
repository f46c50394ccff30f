//! Fused inference for channels-last networks: a convolution, the per-channel affine map after
//! it (a BatchNorm's eval-mode map, or a folded bias), a residual add and the activation, all
//! in the convolution's own output pass.
//!
//! Unfused, each of those is a pass over the whole output with a fresh, zero-filled buffer; at
//! inference nothing needs the intermediate tensors, so the CPU path applies them to each output
//! row while the convolution has it in cache (the lean convolution's stencil runs row by row
//! after its GEMM; a pointwise convolution's GEMM output is finished in place). The fused path
//! builds no autograd graph, so it runs only when nothing asks for gradients: no input tracks an
//! op or is a variable. Otherwise, and on other devices, the same result comes from the
//! composite ops with their backward. Both compute the same operations in the same order:
//! y = act((conv(x) · scale + shift) + residual).

use crate::activation::{activation, add_activation, Activation};
use crate::channels_last::{
    channel_affine_nhwc, check_lean_input, dense3x3_conv2d_nhwc, depthwise_conv2d_nhwc, dims_nhwc, geometry,
    lean_conv2d_nhwc, pointwise_conv2d_nhwc, pointwise_geometry,
};
use crate::error::{shape_err, Result};
use crate::kernels::nhwc::Prepared;
use crate::kernels::rows::Epilogue;
use crate::lean_conv::LeanConv2dConfig;
use crate::real::{dispatch_dtype, tensor, with_data, Real};
use crate::BatchNorm2d;
use candle_core::Tensor;

mod chain;
pub use chain::{conv_chain_nhwc, ChainLayer};

/// The convolution of [`conv_affine_act_nhwc`], with the weights in their NCHW (torchvision)
/// shapes, as the channels-last ops take them.
#[derive(Clone, Copy, Debug)]
pub enum ConvWeights<'a> {
    /// A lean convolution ([`crate::lean_conv2d`]'s weights).
    Lean {
        /// (Cout, Cin, 1, 1).
        pointwise: &'a Tensor,
        /// (Cout, g, |S|).
        stencil: &'a Tensor,
        /// Its configuration.
        cfg: &'a LeanConv2dConfig,
    },
    /// An unpadded 1x1 convolution, weight (Cout, Cin, 1, 1).
    Pointwise {
        /// The weight.
        weight: &'a Tensor,
        /// The stride.
        stride: usize,
    },
    /// A depthwise 3x3 convolution, weight (C·m, 1, 3, 3), padding = dilation.
    Depthwise {
        /// The weight.
        weight: &'a Tensor,
        /// The stride.
        stride: usize,
        /// The dilation.
        dilation: usize,
    },
    /// A dense 3x3 convolution (groups 1), weight (Cout, Cin, 3, 3), padding = dilation: a
    /// direct kernel for few input channels ([`crate::channels_last::dense3x3_conv2d_nhwc`]).
    Dense3x3 {
        /// The weight.
        weight: &'a Tensor,
        /// The stride.
        stride: usize,
        /// The dilation.
        dilation: usize,
    },
}

/// The per-channel affine map after the convolution.
#[derive(Clone, Copy, Debug)]
pub enum ChannelAffine<'a> {
    /// None.
    Identity,
    /// A bias (Cout,) (a convolution whose BatchNorm was folded into it).
    Bias(&'a Tensor),
    /// A BatchNorm's eval-mode map (running statistics).
    BatchNorm(&'a BatchNorm2d),
}

/// y = act((conv(x) · scale + shift) + residual) for a channels-last x (N, H, W, Cin): the end
/// of a `Conv2dNormActivation`, or of a residual block when `residual` (the output's shape) is
/// given. The BatchNorm runs in eval mode. One pass over the output on the CPU when no input
/// asks for gradients (see the module docs); the composite ops otherwise.
pub fn conv_affine_act_nhwc(
    x: &Tensor,
    conv: ConvWeights<'_>,
    affine: ChannelAffine<'_>,
    residual: Option<&Tensor>,
    act: Activation,
) -> Result<Tensor> {
    conv_affine_act_nhwc_prepared(x, conv, None, affine, residual, act)
}

/// The pointwise weight (Cout, Cin, 1, 1) of a lean or 1x1 convolution transposed to a
/// contiguous (Cin, Cout): what [`conv_affine_act_nhwc_prepared`] takes, made once for a model
/// prepared for inference (its weights no longer change).
pub fn transpose_pointwise(weight: &Tensor) -> Result<Tensor> {
    match *weight.dims() {
        [cout, cin, 1, 1] => Ok(weight.reshape((cout, cin))?.t()?.contiguous()?),
        ref d => Err(shape_err(
            "transpose_pointwise",
            format!("weight must be (Cout, Cin, 1, 1), got {d:?}"),
        )),
    }
}

/// A convolution's weights rearranged once for inference, as the CPU kernels read them: the
/// pointwise weight transposed to (Cin, Cout) ([`transpose_pointwise`]) and the stencil's
/// weights taps-major, (|S|, g, Cout). For a model whose weights no longer change (BatchNorm
/// folded): [`conv_affine_act_nhwc_prepared`] then reads them in place instead of rearranging
/// the weights on every call (at batch 1 that costs as much as a small layer's arithmetic).
#[derive(Clone, Debug)]
pub struct PreparedConv {
    pointwise_t: Option<Tensor>,
    /// P in the AVX2 kernel's panels (`kernels::fused_avx2`), where Cout is a multiple of 8.
    panels: Option<Tensor>,
    taps: Option<Tensor>,
}

impl PreparedConv {
    /// The rearranged weights of `conv` (any device; the fast path that reads them runs on the
    /// CPU).
    pub fn new(conv: ConvWeights<'_>) -> Result<Self> {
        // (Cout, g, |S|) -> (|S|, g, Cout).
        let taps_major = |q: &Tensor| -> Result<Tensor> { Ok(q.permute((2, 1, 0))?.contiguous()?) };
        Ok(match conv {
            ConvWeights::Lean { pointwise, stencil, .. } => {
                let pt = transpose_pointwise(pointwise)?;
                PreparedConv {
                    panels: panels(&pt)?,
                    pointwise_t: Some(pt),
                    taps: Some(taps_major(stencil)?),
                }
            }
            ConvWeights::Pointwise { weight, .. } => {
                let pt = transpose_pointwise(weight)?;
                PreparedConv {
                    panels: panels(&pt)?,
                    pointwise_t: Some(pt),
                    taps: None,
                }
            }
            ConvWeights::Depthwise {
                weight,
                stride,
                dilation,
            } => {
                let c = weight.dim(0)?;
                // The input channels do not matter here: the weight's own shape is checked.
                let (_, q) = crate::depthwise::as_stencil("PreparedConv", c.max(1), weight, stride, dilation)?;
                PreparedConv {
                    pointwise_t: None,
                    panels: None,
                    taps: Some(taps_major(&q)?),
                }
            }
            ConvWeights::Dense3x3 {
                weight,
                stride,
                dilation,
            } => {
                let c = weight.dim(1)?;
                let (_, q) = crate::depthwise::dense3x3_as_stencil("PreparedConv", c, weight, stride, dilation)?;
                PreparedConv {
                    pointwise_t: None,
                    panels: None,
                    taps: Some(taps_major(&q)?),
                }
            }
        })
    }
}

/// Pᵀ (Cin, Cout) packed as `kernels::fused_avx2::pack_panels` packs P: for each block of 16
/// output channels (the last one 8 wide), its columns k-major; `None` where Cout is not a
/// multiple of 8 (the kernel does not run those).
fn panels(pt: &Tensor) -> Result<Option<Tensor>> {
    use crate::kernels::fused_avx2::PANEL;
    let (cin, cout) = pt.dims2()?;
    if cout == 0 || !cout.is_multiple_of(8) {
        return Ok(None);
    }
    let full = cout / PANEL * PANEL;
    let mut parts = Vec::new();
    if full > 0 {
        let wide = pt
            .narrow(1, 0, full)?
            .contiguous()?
            .reshape((cin, full / PANEL, PANEL))?;
        parts.push(wide.permute((1, 0, 2))?.contiguous()?.flatten_all()?);
    }
    if full < cout {
        parts.push(pt.narrow(1, full, cout - full)?.contiguous()?.flatten_all()?);
    }
    Ok(Some(Tensor::cat(&parts, 0)?))
}

/// [`conv_affine_act_nhwc`] with the convolution's weights also given as prepared once for
/// inference ([`PreparedConv`]): on the CPU fast path the kernels read them in place, where they
/// would otherwise rearrange the weights on every call (or, for outputs of few pixel rows, take
/// a slower kernel that reads the pointwise weight as stored). They must be `conv`'s own (the
/// composite path, taken when anything asks for gradients, uses `conv` alone): a shape that does
/// not match is an error.
pub fn conv_affine_act_nhwc_prepared(
    x: &Tensor,
    conv: ConvWeights<'_>,
    prepared: Option<&PreparedConv>,
    affine: ChannelAffine<'_>,
    residual: Option<&Tensor>,
    act: Activation,
) -> Result<Tensor> {
    const OP: &str = "conv_affine_act_nhwc";
    let (geom, p, q) = match conv {
        ConvWeights::Lean {
            pointwise,
            stencil,
            cfg,
        } => {
            let (n, h, w) = check_lean_input(OP, cfg, x, Some(pointwise), stencil)?;
            (
                geometry(cfg, n, h, w, true),
                Some(pointwise.clone()),
                Some(stencil.clone()),
            )
        }
        ConvWeights::Pointwise { weight, stride } => {
            (pointwise_geometry(OP, x, weight, stride)?, Some(weight.clone()), None)
        }
        ConvWeights::Depthwise {
            weight,
            stride,
            dilation,
        } => {
            let (_, _, _, c) = dims_nhwc(OP, x)?;
            let (cfg, q) = crate::depthwise::as_stencil(OP, c, weight, stride, dilation)?;
            let (n, h, w) = check_lean_input(OP, &cfg, x, None, &q)?;
            (geometry(&cfg, n, h, w, false), None, Some(q))
        }
        ConvWeights::Dense3x3 {
            weight,
            stride,
            dilation,
        } => {
            let (_, _, _, c) = dims_nhwc(OP, x)?;
            let (cfg, q) = crate::depthwise::dense3x3_as_stencil(OP, c, weight, stride, dilation)?;
            let (n, h, w) = check_lean_input(OP, &cfg, x, None, &q)?;
            (geometry(&cfg, n, h, w, false), None, Some(q))
        }
    };
    let out_shape = [geom.n, geom.ho, geom.wo, geom.cout];
    let cout = geom.cout;
    let pointwise_t = prepared.and_then(|w| w.pointwise_t.as_ref()).filter(|_| p.is_some());
    let panels = prepared.and_then(|w| w.panels.as_ref()).filter(|_| p.is_some());
    let taps = prepared.and_then(|w| w.taps.as_ref()).filter(|_| q.is_some());
    for (t, what, want) in [
        (
            pointwise_t,
            "transposed pointwise weight",
            p.as_ref().map(|_| vec![geom.cin, cout]),
        ),
        (
            panels,
            "packed pointwise weight",
            p.as_ref().map(|_| vec![geom.cin * cout]),
        ),
        (
            taps,
            "taps-major stencil weight",
            q.as_ref().map(|q| q.dims().iter().rev().copied().collect()),
        ),
    ] {
        if let (Some(t), Some(want)) = (t, want) {
            if t.dims() != want || t.dtype() != x.dtype() {
                return Err(shape_err(
                    OP,
                    format!(
                        "the prepared {what} must be {want:?} {:?}, got {:?} {:?}",
                        x.dtype(),
                        t.dims(),
                        t.dtype()
                    ),
                ));
            }
        }
    }
    if prepared.is_some() && (p.is_some() != pointwise_t.is_some() || q.is_some() != taps.is_some()) {
        return Err(shape_err(
            OP,
            "the prepared weights are those of another kind of convolution".to_string(),
        ));
    }
    let mut grads_wanted = x.track_op() || p.iter().chain(&q).any(|t| t.track_op());
    match affine {
        ChannelAffine::Identity => {}
        ChannelAffine::Bias(b) => {
            if b.dims() != [cout] {
                return Err(shape_err(
                    OP,
                    format!("bias must have shape [{cout}], got {:?}", b.dims()),
                ));
            }
            grads_wanted |= b.track_op();
        }
        ChannelAffine::BatchNorm(bn) => {
            if bn.num_features() != cout {
                return Err(shape_err(
                    OP,
                    format!(
                        "the BatchNorm has {} channels, the convolution {cout}",
                        bn.num_features()
                    ),
                ));
            }
            // The running statistics are buffers (never differentiated); γ and β may be trained.
            grads_wanted |= bn.weight().track_op() || bn.bias().track_op();
        }
    }
    if let Some(r) = residual {
        if r.dims() != out_shape || r.dtype() != x.dtype() {
            return Err(shape_err(
                OP,
                format!(
                    "residual must be {:?} {:?} like the output, got {:?} {:?}",
                    out_shape,
                    x.dtype(),
                    r.dims(),
                    r.dtype()
                ),
            ));
        }
        grads_wanted |= r.track_op();
    }
    let on_cpu = x.device().is_cpu()
        && residual.is_none_or(|r| r.device().is_cpu())
        && pointwise_t.is_none_or(|t| t.device().is_cpu())
        && panels.is_none_or(|t| t.device().is_cpu())
        && taps.is_none_or(|t| t.device().is_cpu());
    if grads_wanted || !on_cpu {
        return composite(x, conv, affine, residual, act);
    }
    let run = || -> candle_core::Result<Tensor> {
        dispatch_dtype!(OP, x.dtype(), |T| {
            let (scale, shift) = host_affine::<T>(affine, cout)?;
            with_data::<T, _>(x, |xs| {
                with_opt::<T, _>(p.as_ref(), |ps| {
                    with_opt::<T, _>(q.as_ref(), |qs| {
                        with_opt::<T, _>(residual, |rs| {
                            with_opt::<T, _>(pointwise_t, |pts| {
                                with_opt::<T, _>(panels, |pps| {
                                    with_opt::<T, _>(taps, |qts| {
                                        let epi = Epilogue {
                                            scale: &scale,
                                            shift: &shift,
                                            residual: rs,
                                            act,
                                        };
                                        let prepared = Prepared {
                                            pt: pts,
                                            panels: pps,
                                            qt: qts,
                                        };
                                        tensor(geom.forward(xs, ps, qs, Some(&epi), prepared), &out_shape)
                                    })
                                })
                            })
                        })
                    })
                })
            })
        })
    };
    Ok(run()?)
}

/// The same result from the composite channels-last ops (autograd, any device).
fn composite(
    x: &Tensor,
    conv: ConvWeights<'_>,
    affine: ChannelAffine<'_>,
    residual: Option<&Tensor>,
    act: Activation,
) -> Result<Tensor> {
    let y = match conv {
        ConvWeights::Lean {
            pointwise,
            stencil,
            cfg,
        } => lean_conv2d_nhwc(x, pointwise, stencil, None, cfg)?,
        ConvWeights::Pointwise { weight, stride } => pointwise_conv2d_nhwc(x, weight, None, stride)?,
        ConvWeights::Depthwise {
            weight,
            stride,
            dilation,
        } => depthwise_conv2d_nhwc(x, weight, None, stride, dilation)?,
        ConvWeights::Dense3x3 {
            weight,
            stride,
            dilation,
        } => dense3x3_conv2d_nhwc(x, weight, None, stride, dilation)?,
    };
    // The activation goes after the residual add when there is one.
    let inner = if residual.is_some() { Activation::None } else { act };
    let y = match affine {
        ChannelAffine::Identity => activation(&y, inner)?,
        ChannelAffine::Bias(b) => channel_affine_nhwc(&y, &Tensor::ones(b.dims1()?, y.dtype(), y.device())?, b, inner)?,
        ChannelAffine::BatchNorm(bn) => bn.forward_act_nhwc(&y, false, inner)?,
    };
    match residual {
        Some(r) => add_activation(&y, r, act),
        None => Ok(y),
    }
}

/// (scale, shift) of the affine map on the host, in `T` and with the same operations as the
/// composite path (BatchNorm: invstd = 1 / sqrt(var + eps), scale = γ · invstd,
/// shift = β - mean · scale).
fn host_affine<T: Real>(affine: ChannelAffine<'_>, c: usize) -> candle_core::Result<(Vec<T>, Vec<T>)> {
    let host = |t: &Tensor| with_data::<T, _>(&t.to_dtype(T::DTYPE)?, |v| Ok(v.to_vec()));
    Ok(match affine {
        ChannelAffine::Identity => (vec![T::one(); c], vec![T::zero(); c]),
        ChannelAffine::Bias(b) => (vec![T::one(); c], host(b)?),
        ChannelAffine::BatchNorm(bn) => {
            let eps = T::from_f64(bn.config().eps);
            let (w, b) = (host(bn.weight())?, host(bn.bias())?);
            let (mean, var) = (host(bn.running_mean())?, host(bn.running_var())?);
            let scale: Vec<T> = w
                .iter()
                .zip(&var)
                .map(|(w, v)| *w * ((*v * T::one() + eps).sqrt()).recip())
                .collect();
            let shift = b
                .iter()
                .zip(&mean)
                .zip(&scale)
                .map(|((b, m), s)| *b - *m * *s)
                .collect();
            (scale, shift)
        }
    })
}

/// [`with_data`] for an optional tensor.
fn with_opt<T: Real, R>(
    t: Option<&Tensor>,
    f: impl FnOnce(Option<&[T]>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match t {
        Some(t) => with_data::<T, _>(t, |s| f(Some(s))),
        None => f(None),
    }
}
