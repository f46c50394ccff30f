//! A chain of fused layers run one sample at a time (`kernels::chain`): MobileNetV2's inverted
//! residual at inference without its expanded tensor ever leaving the cache.

use super::{host_affine, ChannelAffine, ConvWeights, PreparedConv};
use crate::activation::Activation;
use crate::channels_last::{dims_nhwc, geometry};
use crate::error::Result;
use crate::kernels::chain;
use crate::kernels::nhwc::NhwcConv;
use crate::real::{tensor, with_data};
use candle_core::{DType, Tensor};

/// The fewest samples [`conv_chain_nhwc`] runs: each sample is one thread's task, so a smaller
/// batch would leave cores idle (the layer-by-layer path splits one sample's rows instead). A
/// constant: whether the chain runs never depends on the number of threads.
const MIN_SAMPLES: usize = 4;

/// One layer of [`conv_chain_nhwc`]: act(affine(conv(x))), as
/// [`super::conv_affine_act_nhwc_prepared`] takes it.
#[derive(Clone, Copy, Debug)]
pub struct ChainLayer<'a> {
    /// The convolution: the chain runs [`ConvWeights::Pointwise`] and [`ConvWeights::Depthwise`].
    pub conv: ConvWeights<'a>,
    /// Its weights prepared for inference, if they were (else the chain prepares them).
    pub prepared: Option<&'a PreparedConv>,
    /// The affine map after it.
    pub affine: ChannelAffine<'a>,
    /// The activation (after the residual add on the last layer).
    pub act: Activation,
}

/// A chain of channels-last convolutions at inference, each layer act(affine(conv(x))) and the
/// last one, where `residual`, act(affine(conv(h)) + x) with the chain's input x: MobileNetV2's
/// inverted residual (expand 1x1, depthwise 3x3, project 1x1).
///
/// On the CPU with f32 data and the fused AVX2 kernels active, each sample runs through all the
/// layers on one thread, the intermediate tensors in per-thread buffers that stay in cache;
/// each layer's values are those of [`super::conv_affine_act_nhwc_prepared`] on an output of
/// at least 256 pixels (the same kernels, the same sums).
///
/// `Ok(None)` where this path does not run the chain: another device, dtype or instruction
/// set, an input that asks for gradients, fewer than 4 samples, layers other than 1x1 and
/// depthwise ones, shapes that do not chain. The caller then runs the layers one by one with
/// [`super::conv_affine_act_nhwc_prepared`], which also reports what is wrong with a shape.
pub fn conv_chain_nhwc(x: &Tensor, layers: &[ChainLayer<'_>], residual: bool) -> Result<Option<Tensor>> {
    const OP: &str = "conv_chain_nhwc";
    let usable = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu() && !t.track_op();
    if !usable(x) || layers.is_empty() {
        return Ok(None);
    }
    let Ok((n, h, w, c)) = dims_nhwc(OP, x) else {
        return Ok(None);
    };
    if n < MIN_SAMPLES {
        return Ok(None);
    }
    // Per layer: its one-sample geometry and epilogue, and (apart, borrowed by the kernel's
    // layers) its weights on the host as the kernels read them.
    let (mut geoms, mut weights) = (Vec::with_capacity(layers.len()), Vec::with_capacity(layers.len()));
    let mut shape = (h, w, c);
    for layer in layers {
        let Some((conv, wt)) = plan(shape, layer.conv, layer.prepared)? else {
            return Ok(None);
        };
        let affine_ok = match layer.affine {
            ChannelAffine::Identity => true,
            ChannelAffine::Bias(b) => b.dims() == [conv.cout] && !b.track_op(),
            ChannelAffine::BatchNorm(bn) => {
                bn.num_features() == conv.cout && !bn.weight().track_op() && !bn.bias().track_op()
            }
        };
        if !affine_ok {
            return Ok(None);
        }
        let (scale, shift) = host_affine::<f32>(layer.affine, conv.cout)?;
        shape = (conv.ho, conv.wo, conv.cout);
        weights.push(wt);
        geoms.push((conv, scale, shift, layer.act));
    }
    if residual && shape != (h, w, c) {
        return Ok(None);
    }
    let kernel_layers: Vec<chain::Layer<'_>> = geoms
        .into_iter()
        .zip(&weights)
        .map(|((conv, scale, shift, act), weights)| chain::Layer {
            conv,
            weights,
            scale,
            shift,
            act,
        })
        .collect();
    if !chain::applies(&kernel_layers) {
        return Ok(None);
    }
    let y = with_data::<f32, _>(x, |xs| Ok(chain::run(n, xs, &kernel_layers, residual)))?;
    Ok(Some(tensor(y, &[n, shape.0, shape.1, shape.2])?))
}

/// One sample's geometry of `conv` on an (H, W, C) input and its weights on the host as the
/// kernel reads them (from `prepared` where given, else rearranged here); `None` for a
/// convolution the chain does not run or weights that do not fit.
fn plan(
    (h, w, c): (usize, usize, usize),
    conv: ConvWeights<'_>,
    prepared: Option<&PreparedConv>,
) -> Result<Option<(NhwcConv, Vec<f32>)>> {
    let usable = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu() && !t.track_op();
    let host = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    Ok(match conv {
        ConvWeights::Pointwise { weight, stride } => {
            let &[cout, cin, 1, 1] = weight.dims() else {
                return Ok(None);
            };
            if cin != c || stride == 0 || !usable(weight) {
                return Ok(None);
            }
            let panels = match prepared.and_then(|p| p.panels.as_ref()) {
                Some(t) if t.dims() == [cin * cout] && usable(t) => host(t)?,
                Some(_) => return Ok(None),
                None => {
                    let p = host(weight)?;
                    crate::kernels::fused_avx2::pack_panels(cin, cout, |k, co| p[co * cin + k])
                }
            };
            Some((NhwcConv::pointwise_only(1, h, w, cin, cout, stride), panels))
        }
        ConvWeights::Depthwise {
            weight,
            stride,
            dilation,
        } => {
            let Ok((cfg, q)) = crate::depthwise::as_stencil("conv_chain_nhwc", c, weight, stride, dilation) else {
                return Ok(None);
            };
            let (cout, nt) = (cfg.out_channels, cfg.stencil.taps().len());
            if cfg.validate().is_err() || !usable(weight) || q.dims() != [cout, 1, nt] {
                return Ok(None);
            }
            let conv = geometry(&cfg, 1, h, w, false);
            let taps = match (prepared.and_then(|p| p.taps.as_ref()), &conv.stencil) {
                (Some(t), _) if t.dims() == [nt, 1, cout] && usable(t) => host(t)?,
                (None, Some(st)) => conv.taps_major(st, &host(&q)?),
                _ => return Ok(None),
            };
            Some((conv, taps))
        }
        ConvWeights::Lean { .. } | ConvWeights::Dense3x3 { .. } => None,
    })
}
