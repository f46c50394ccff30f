//! The layers the networks are made of: a convolution of any kind followed by BatchNorm and an
//! activation (foldable for inference), a linear classifier, the stem max-pool, and how a lean
//! convolution's branches share its output ([`LeanBranchStats`]).

use crate::Result;
use candle_core::{DType, Module, Tensor};
use candle_nn::{Init, VarBuilder};
use lean_ops::channels_last::ChannelMoments;
use lean_ops::fused::{conv_affine_act_nhwc_prepared, ChainLayer, ChannelAffine, ConvWeights, PreparedConv};
use lean_ops::{
    activation, add_activation, channels_last, max_pool2d, Activation, BatchNorm2d, BatchNormConfig, Conv2d,
    Conv2dConfig, Cost, CostModel, DepthwiseConv2d, LeanConv2d, LeanConv2dConfig, LeanInit, Pool2dConfig, Stencil,
};

pub use crate::trace::{LayerRow, Trace};

/// torchvision's max-pool after an ImageNet stem (3x3, stride 2, padding 1), shared by ResNet
/// and ShuffleNetV2.
fn stem_pool() -> Pool2dConfig {
    Pool2dConfig::new(3, 2, 1)
}

/// Values of a block's widest intermediate tensor per chunk of samples at channels-last
/// inference (2.5 MiB of f32: it stays in the caches between the block's layers; for
/// MobileNetV2 at batch 64, 1 MiB measured the same, 384 KiB slower: more, smaller calls).
const CHUNK_VALUES: usize = 640 << 10;

/// A block's channels-last inference `f` on the batch `x` (N, H, W, C), a chunk of samples at a
/// time where a sample's widest intermediate tensor (`per_sample` values) times the batch
/// exceeds [`CHUNK_VALUES`]: the intermediates stay in cache instead of making a round trip
/// through memory. Every value of such a block is per sample (eval-mode BatchNorm), so the
/// chunks give the same values as one call. Worth it where a block widens its input
/// (MobileNetV2's expansion); the lean ResNet's and ShuffleNetV2's blocks measured 0.93x and
/// 0.87x chunked at batch 64 (calls on fewer rows cost more than the traffic saved).
pub(crate) fn in_sample_chunks(x: &Tensor, per_sample: usize, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let n = x.dim(0)?;
    let chunk = (CHUNK_VALUES / per_sample.max(1)).max(1);
    if n <= chunk {
        return f(x);
    }
    let outs = (0..n)
        .step_by(chunk)
        .map(|s| f(&x.narrow(0, s, chunk.min(n - s))?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&outs, 0)?)
}

/// Applies the ImageNet stem's max-pool.
pub(crate) fn stem_max_pool(x: &Tensor) -> Result<Tensor> {
    Ok(max_pool2d(x, &stem_pool())?)
}

/// Records the ImageNet stem's max-pool in a trace; returns its output shape.
pub(crate) fn trace_stem_max_pool(t: &mut Trace, s: &[usize]) -> Result<Vec<usize>> {
    let (h, w) = stem_pool().output_hw("maxpool", s[2], s[3])?;
    Ok(t.push("maxpool", "maxpool", Default::default(), vec![s[0], s[1], h, w]))
}

/// The 3x3 convolutions of a (lean) ResNet: dense, or lean with its knobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conv3x3Kind {
    /// A dense 3x3 convolution (torchvision's ResNet).
    Dense,
    /// A lean convolution (docs/lean-conv.md) in place of every 3x3 of the residual blocks.
    Lean {
        /// The stencil of the grouped branch.
        stencil: Stencil,
        /// Input channels per group (1 = depthwise).
        group_size: usize,
        /// Keep the strided (downsampling) 3x3 convolutions dense.
        dense_downsample: bool,
        /// How new lean weights are drawn.
        init: LeanInit,
    },
}

impl Conv3x3Kind {
    /// The default lean knobs: five-point stencil, depthwise, lean downsampling.
    pub fn lean() -> Self {
        Conv3x3Kind::Lean {
            stencil: Stencil::Five,
            group_size: 1,
            dense_downsample: false,
            init: LeanInit::Balanced,
        }
    }
}

/// A convolution of any of the kinds the networks use.
#[derive(Clone, Debug)]
pub enum Conv {
    /// Dense (groups = 1), any kernel size.
    Dense(Conv2d),
    /// Lean (pointwise + grouped stencil).
    Lean(LeanConv2d),
    /// Depthwise 3x3.
    Depthwise(DepthwiseConv2d),
}

impl Conv {
    /// A dense `k` x `k` convolution with padding `k/2·dilation`, no bias.
    pub fn dense(cin: usize, cout: usize, k: usize, stride: usize, dilation: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig::new(cin, cout, k)
            .stride(stride)
            .padding(k / 2 * dilation)
            .dilation(dilation);
        Ok(Conv::Dense(Conv2d::new(cfg, vb)?))
    }

    /// A 3x3 convolution of the given kind (padding = dilation).
    pub fn conv3x3(
        kind: Conv3x3Kind,
        cin: usize,
        cout: usize,
        stride: usize,
        dilation: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        match kind {
            Conv3x3Kind::Lean {
                stencil,
                group_size,
                dense_downsample,
                init,
            } if !(dense_downsample && stride > 1) => {
                if group_size == 0 || group_size > cin || cin % group_size != 0 {
                    return Err(crate::Error::Config {
                        model: vb.prefix(),
                        msg: format!("group size {group_size} does not divide the layer's {cin} input channels"),
                    });
                }
                // A channel-reducing lean conv needs larger groups (Cout must be a multiple of
                // the Cin / g groups): the smallest multiple of the requested size that fits.
                let mut g = group_size;
                while cin % g != 0 || cout % (cin / g) != 0 {
                    g += group_size;
                }
                let cfg = LeanConv2dConfig::new(cin, cout)
                    .stencil(stencil)
                    .group_size(g)
                    .stride(stride)
                    .dilation(dilation)
                    .init(init);
                Ok(Conv::Lean(LeanConv2d::new(cfg, vb)?))
            }
            _ => Conv::dense(cin, cout, 3, stride, dilation, vb),
        }
    }

    fn kind(&self) -> String {
        match self {
            Conv::Dense(c) => format!("conv{0}x{0}", c.config().kernel_size),
            Conv::Lean(c) => format!("lean3x3/{}", c.config().stencil),
            Conv::Depthwise(_) => "dw3x3".into(),
        }
    }

    /// The same convolution followed by y·scale[o] + shift[o]: weights scaled per output
    /// channel, the shift becomes (part of) the bias.
    fn folded(&self, scale: &Tensor, shift: &Tensor) -> Result<Conv> {
        let per_out = |w: &Tensor| -> Result<Tensor> {
            let mut shape = vec![1; w.rank()];
            shape[0] = w.dim(0)?;
            Ok(w.broadcast_mul(&scale.reshape(shape)?)?)
        };
        let bias = |b: Option<&Tensor>| -> Result<Tensor> {
            Ok(match b {
                Some(b) => ((b * scale)? + shift)?,
                None => shift.clone(),
            })
        };
        Ok(match self {
            Conv::Dense(c) => {
                let k = c.config();
                Conv::Dense(Conv2d::from_weights(
                    per_out(c.weight())?,
                    Some(bias(c.bias())?),
                    k.stride,
                    k.padding,
                    k.dilation,
                )?)
            }
            Conv::Lean(c) => Conv::Lean(LeanConv2d::from_weights(
                *c.config(),
                per_out(c.pointwise_weight())?,
                per_out(c.stencil_weight())?,
                Some(bias(c.bias())?),
            )?),
            Conv::Depthwise(c) => Conv::Depthwise(DepthwiseConv2d::from_weights(
                per_out(c.weight())?,
                Some(bias(c.bias())?),
                c.stride(),
                c.dilation(),
            )),
        })
    }
}

/// The most input channels of a dense 3x3 convolution that runs channels-last: as a direct
/// stencil kernel, which beats an unfolded GEMM (K = 9·Cin) only for a network's first layer.
const NHWC_DENSE3X3_MAX_CIN: usize = 4;

impl Conv {
    /// Whether [`Conv::forward_nhwc`] runs this convolution: lean, depthwise and unpadded 1x1
    /// ones, and 3x3 ones (padding = dilation) of at most four input channels (a stem).
    pub fn supports_nhwc(&self) -> bool {
        match self {
            Conv::Lean(_) | Conv::Depthwise(_) => true,
            Conv::Dense(c) => {
                let k = c.config();
                (k.kernel_size == 1 && k.padding == 0 && k.dilation == 1) || self.is_nhwc_dense3x3()
            }
        }
    }

    /// A dense 3x3 convolution that runs channels-last as a stencil ([`NHWC_DENSE3X3_MAX_CIN`]).
    fn is_nhwc_dense3x3(&self) -> bool {
        match self {
            Conv::Dense(c) => {
                let k = c.config();
                k.kernel_size == 3 && k.padding == k.dilation && k.in_channels <= NHWC_DENSE3X3_MAX_CIN
            }
            _ => false,
        }
    }

    /// The weights as the channels-last ops take them; `None` where there is no channels-last
    /// path ([`Conv::supports_nhwc`]).
    pub fn nhwc_weights(&self) -> Option<ConvWeights<'_>> {
        match self {
            Conv::Lean(c) => Some(ConvWeights::Lean {
                pointwise: c.pointwise_weight(),
                stencil: c.stencil_weight(),
                cfg: c.config(),
            }),
            Conv::Dense(c) if self.is_nhwc_dense3x3() => Some(ConvWeights::Dense3x3 {
                weight: c.weight(),
                stride: c.config().stride,
                dilation: c.config().dilation,
            }),
            Conv::Dense(c) if self.supports_nhwc() => Some(ConvWeights::Pointwise {
                weight: c.weight(),
                stride: c.config().stride,
            }),
            Conv::Depthwise(c) => Some(ConvWeights::Depthwise {
                weight: c.weight(),
                stride: c.stride(),
                dilation: c.dilation(),
            }),
            Conv::Dense(_) => None,
        }
    }

    /// The convolution of a channels-last (N, H, W, C) input, output channels-last.
    pub fn forward_nhwc(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_nhwc_bias(x, true)
    }

    /// The bias, if the convolution has one.
    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Conv::Dense(c) => c.bias(),
            Conv::Lean(c) => c.bias(),
            Conv::Depthwise(c) => c.bias(),
        }
    }

    /// [`Conv::forward_nhwc`] that also sums its output's per-channel moments around `shift` for
    /// the BatchNorm after it, where the op can (`lean_ops::channels_last::*_moments`): no bias,
    /// an output large enough for row tasks.
    pub fn forward_nhwc_moments(&self, x: &Tensor, shift: &[f64]) -> Result<(Tensor, Option<ChannelMoments>)> {
        if self.bias().is_some() {
            return Ok((self.forward_nhwc(x)?, None));
        }
        Ok(match self {
            Conv::Lean(c) => {
                channels_last::lean_conv2d_nhwc_moments(x, c.pointwise_weight(), c.stencil_weight(), c.config(), shift)?
            }
            Conv::Dense(c) if self.is_nhwc_dense3x3() => {
                let k = c.config();
                channels_last::dense3x3_conv2d_nhwc_moments(x, c.weight(), k.stride, k.dilation, shift)?
            }
            Conv::Dense(c) if self.supports_nhwc() => {
                channels_last::pointwise_conv2d_nhwc_moments(x, c.weight(), c.config().stride, shift)?
            }
            Conv::Depthwise(c) => {
                channels_last::depthwise_conv2d_nhwc_moments(x, c.weight(), c.stride(), c.dilation(), shift)?
            }
            _ => (self.forward_nhwc(x)?, None),
        })
    }

    /// [`Conv::forward_nhwc`], leaving out the bias when `with_bias` is false.
    fn forward_nhwc_bias(&self, x: &Tensor, with_bias: bool) -> Result<Tensor> {
        let bias = if with_bias { self.bias() } else { None };
        match self {
            Conv::Lean(c) => Ok(channels_last::lean_conv2d_nhwc(
                x,
                c.pointwise_weight(),
                c.stencil_weight(),
                bias,
                c.config(),
            )?),
            Conv::Dense(c) if self.is_nhwc_dense3x3() => Ok(channels_last::dense3x3_conv2d_nhwc(
                x,
                c.weight(),
                bias,
                c.config().stride,
                c.config().dilation,
            )?),
            Conv::Dense(c) if self.supports_nhwc() => Ok(channels_last::pointwise_conv2d_nhwc(
                x,
                c.weight(),
                bias,
                c.config().stride,
            )?),
            Conv::Depthwise(c) => Ok(channels_last::depthwise_conv2d_nhwc(
                x,
                c.weight(),
                bias,
                c.stride(),
                c.dilation(),
            )?),
            other => Err(crate::Error::Config {
                model: "channels-last".into(),
                msg: format!("a {} convolution has no channels-last path", other.kind()),
            }),
        }
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Conv::Dense(c) => c.forward(x),
            Conv::Lean(c) => c.forward(x),
            Conv::Depthwise(c) => c.forward(x),
        }
    }
}

impl CostModel for Conv {
    fn cost(&self, input: &[usize]) -> lean_ops::Result<(Cost, Vec<usize>)> {
        match self {
            Conv::Dense(c) => c.cost(input),
            Conv::Lean(c) => c.cost(input),
            Conv::Depthwise(c) => c.cost(input),
        }
    }
}

/// Convolution, BatchNorm, activation — torchvision's `conv`/`bn` pairs and
/// `Conv2dNormActivation`. After [`ConvBnAct::fold_batchnorm`] the BatchNorm lives in the
/// convolution's weights and bias (the fused inference path).
#[derive(Debug)]
pub struct ConvBnAct {
    conv: Conv,
    bn: Option<BatchNorm2d>,
    act: Activation,
    conv_name: String,
    bn_name: String,
    /// After [`ConvBnAct::fold_batchnorm`] on the CPU: the weights rearranged for the fused
    /// channels-last inference (`lean_ops::fused::PreparedConv`), made once since a folded
    /// layer's weights no longer change.
    prepared: Option<PreparedConv>,
}

impl ConvBnAct {
    /// Wraps `conv`, then a BatchNorm built from `bn_vb`, then `act`.
    pub fn new(conv: Conv, cout: usize, act: Activation, conv_vb: &VarBuilder, bn_vb: VarBuilder) -> Result<Self> {
        let bn_name = bn_vb.prefix();
        let bn = BatchNorm2d::new(cout, BatchNormConfig::default(), bn_vb)?;
        Ok(ConvBnAct {
            conv,
            bn: Some(bn),
            act,
            conv_name: conv_vb.prefix(),
            bn_name,
            prepared: None,
        })
    }

    /// torchvision's `Conv2dNormActivation` layout: the conv at `vb.0`, the BatchNorm at `vb.1`.
    pub fn sequential(
        conv: impl FnOnce(VarBuilder) -> Result<Conv>,
        cout: usize,
        act: Activation,
        vb: &VarBuilder,
    ) -> Result<Self> {
        let cvb = vb.pp("0");
        ConvBnAct::new(conv(cvb.clone())?, cout, act, &cvb, vb.pp("1"))
    }

    /// A network's first layer on an NCHW input, its output channels-last with `nhwc`: run
    /// channels-last itself where it can (its input has few channels, so converting that costs
    /// little, and its output, among the network's largest tensors, needs no conversion), else
    /// in NCHW and converted after.
    pub fn forward_stem(&self, x: &Tensor, train: bool, nhwc: bool) -> Result<Tensor> {
        if !nhwc {
            return self.forward_t(x, train);
        }
        if self.supports_nhwc() {
            return self.forward_t_nhwc(&channels_last::to_channels_last(x)?, train);
        }
        Ok(channels_last::to_channels_last(&self.forward_t(x, train)?)?)
    }

    /// The layer in train (batch statistics) or eval mode.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv.forward(x)?;
        Ok(match &self.bn {
            Some(bn) => bn.forward_act(&y, train, self.act)?,
            None => activation(&y, self.act)?,
        })
    }

    /// [`ConvBnAct::forward_t`] on a channels-last (N, H, W, C) input; see
    /// [`Conv::supports_nhwc`].
    pub fn forward_t_nhwc(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train {
            if let Some(y) = self.forward_eval_fused(x, None, self.act)? {
                return Ok(y);
            }
        }
        Ok(match (&self.bn, self.conv.bias()) {
            (Some(bn), _) if train => self.conv_bn_train_nhwc(bn, x, None, self.act)?,
            (Some(bn), _) => bn.forward_act_nhwc(&self.conv.forward_nhwc(x)?, train, self.act)?,
            // Folded: the bias and the activation in one pass.
            (None, Some(b)) => {
                let y = self.conv.forward_nhwc_bias(x, false)?;
                let ones = Tensor::ones(b.dims1()?, y.dtype(), y.device())?;
                channels_last::channel_affine_nhwc(&y, &ones, b, self.act)?
            }
            (None, None) => activation(&self.conv.forward_nhwc(x)?, self.act)?,
        })
    }

    /// The end of a residual block on channels-last tensors: act(layer(x) + residual), for a
    /// layer without an activation of its own. At inference one fused pass
    /// ([`lean_ops::fused`]); in training the BatchNorm, the add and the activation are one op
    /// ([`BatchNorm2d::forward_add_act_nhwc`](lean_ops::BatchNorm2d::forward_add_act_nhwc)).
    pub fn forward_residual_nhwc(&self, x: &Tensor, train: bool, residual: &Tensor, act: Activation) -> Result<Tensor> {
        if self.act == Activation::None {
            if !train {
                if let Some(y) = self.forward_eval_fused(x, Some(residual), act)? {
                    return Ok(y);
                }
            }
            if let Some(bn) = &self.bn {
                if train {
                    return self.conv_bn_train_nhwc(bn, x, Some(residual), act);
                }
                return Ok(bn.forward_add_act_nhwc(&self.conv.forward_nhwc(x)?, train, residual, act)?);
            }
        }
        Ok(add_activation(&self.forward_t_nhwc(x, train)?, residual, act)?)
    }

    /// Training on channels-last tensors: the convolution sums the batch statistics in its own
    /// output pass where it can, and the BatchNorm (with the residual add, if any) uses them.
    fn conv_bn_train_nhwc(
        &self,
        bn: &BatchNorm2d,
        x: &Tensor,
        residual: Option<&Tensor>,
        act: Activation,
    ) -> Result<Tensor> {
        let (y, moments) = self.conv.forward_nhwc_moments(x, &bn.moments_shift()?)?;
        Ok(bn.forward_nhwc_with(&y, true, act, residual, moments)?)
    }

    /// Eval mode on channels-last tensors as one fused op: act(affine(conv(x)) + residual), the
    /// affine map being the BatchNorm's or the folded bias; `None` for a layer it does not
    /// cover (a convolution with both a bias and a BatchNorm, or no channels-last path).
    fn forward_eval_fused(&self, x: &Tensor, residual: Option<&Tensor>, act: Activation) -> Result<Option<Tensor>> {
        let affine = match (&self.bn, self.conv.bias()) {
            (Some(bn), None) => ChannelAffine::BatchNorm(bn),
            (None, Some(b)) => ChannelAffine::Bias(b),
            (None, None) => ChannelAffine::Identity,
            (Some(_), Some(_)) => return Ok(None),
        };
        match self.conv.nhwc_weights() {
            Some(w) => Ok(Some(conv_affine_act_nhwc_prepared(
                x,
                w,
                self.prepared.as_ref(),
                affine,
                residual,
                act,
            )?)),
            None => Ok(None),
        }
    }

    /// The layer as a link of a fused chain ([`lean_ops::fused::conv_chain_nhwc`]), in eval
    /// mode; `None` where it has no channels-last weights or both a bias and a BatchNorm.
    pub fn chain_layer(&self) -> Option<ChainLayer<'_>> {
        let affine = match (&self.bn, self.conv.bias()) {
            (Some(bn), None) => ChannelAffine::BatchNorm(bn),
            (None, Some(b)) => ChannelAffine::Bias(b),
            (None, None) => ChannelAffine::Identity,
            (Some(_), Some(_)) => return None,
        };
        Some(ChainLayer {
            conv: self.conv.nhwc_weights()?,
            prepared: self.prepared.as_ref(),
            affine,
            act: self.act,
        })
    }

    /// [`ConvBnAct::forward_t_nhwc`] with `nhwc`, else [`ConvBnAct::forward_t`]: for blocks that
    /// run in either layout.
    pub fn forward_in(&self, x: &Tensor, train: bool, nhwc: bool) -> Result<Tensor> {
        if nhwc {
            self.forward_t_nhwc(x, train)
        } else {
            self.forward_t(x, train)
        }
    }

    /// Whether [`ConvBnAct::forward_t_nhwc`] runs this layer.
    pub fn supports_nhwc(&self) -> bool {
        self.conv.supports_nhwc()
    }

    /// Folds the BatchNorm's eval-mode map into the convolution (inference only afterwards).
    pub fn fold_batchnorm(&mut self) -> Result<()> {
        if let Some(bn) = self.bn.take() {
            let (scale, shift) = bn.eval_scale_shift()?;
            self.conv = self.conv.folded(&scale, &shift)?;
        }
        // The folded weights are new tensors that nothing updates: their rearranged copies can
        // be kept.
        self.prepared = match self.conv.nhwc_weights() {
            Some(w) if self.conv.bias().is_none_or(|b| b.device().is_cpu()) => Some(PreparedConv::new(w)?),
            _ => None,
        };
        Ok(())
    }

    /// The convolution.
    pub fn conv(&self) -> &Conv {
        &self.conv
    }

    /// For a lean convolution, how its two branches share its output on input `x`; `None` for
    /// other convolutions.
    pub fn lean_branch_stats(&self, x: &Tensor) -> Result<Option<LeanBranchStats>> {
        let Conv::Lean(c) = &self.conv else {
            return Ok(None);
        };
        let cfg = c.config();
        let pw = x.conv2d(c.pointwise_weight(), 0, cfg.stride, 1, 1)?;
        let gs = lean_ops::grouped_stencil_conv2d(x, c.stencil_weight(), cfg)?;
        let second_moment = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.sqr()?.mean_all()?.to_scalar()?) };
        let (vp, vs) = (channel_variance(&pw)?, channel_variance(&gs)?);
        Ok(Some(LeanBranchStats {
            name: self.conv_name.clone(),
            in_channels: cfg.in_channels,
            out_channels: cfg.out_channels,
            stencil_share: vs / (vp + vs).max(f64::MIN_POSITIVE),
            gain: second_moment(&(pw + gs)?)? / second_moment(x)?.max(f64::MIN_POSITIVE),
        }))
    }

    /// Adds this layer's rows to `t`; returns the output shape.
    pub fn trace(&self, t: &mut Trace, input: &[usize]) -> Result<Vec<usize>> {
        let (c, out) = self.conv.cost(input)?;
        let out = t.push(&self.conv_name, &self.conv.kind(), c, out);
        match &self.bn {
            Some(bn) => {
                let (c, out) = bn.cost(&out)?;
                Ok(t.push(&self.bn_name, "bn", c, out))
            }
            None => Ok(out),
        }
    }
}

/// How the two branches of one lean convolution share its output, measured on one batch
/// (see [`LeanInit`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LeanBranchStats {
    /// The convolution's name (`layer1.0.conv1`).
    pub name: String,
    /// Input channels Cin.
    pub in_channels: usize,
    /// Output channels Cout.
    pub out_channels: usize,
    /// The stencil branch's share of the output variance, var(GS x) / (var(PW x) + var(GS x)),
    /// each the per-channel variance over batch and pixels (what the BatchNorm after the sum
    /// sees), summed over channels.
    pub stencil_share: f64,
    /// The second-moment gain E[y²] / E[x²] of the whole lean convolution; Kaiming fan-out init
    /// gives 2·Cin/Cout for independent zero-mean inputs.
    pub gain: f64,
}

/// Per-channel variance over (N, H, W), summed over channels, in f64.
fn channel_variance(t: &Tensor) -> Result<f64> {
    let t = t.to_dtype(DType::F64)?;
    let mean = t.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
    let var = t
        .broadcast_sub(&mean)?
        .sqr()?
        .mean_keepdim(0)?
        .mean_keepdim(2)?
        .mean_keepdim(3)?;
    Ok(var.sum_all()?.to_scalar()?)
}

/// A linear classifier with torchvision's names (`weight` (out, in), `bias`).
#[derive(Clone, Debug)]
pub struct Classifier {
    linear: candle_nn::Linear,
    in_features: usize,
    out_features: usize,
    name: String,
}

impl Classifier {
    /// A new `in_features -> out_features` layer (weights N(0, 0.01), zero bias, as torchvision
    /// initialises MobileNetV2's classifier) or the stored one.
    pub fn new(in_features: usize, out_features: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb.get_with_hints(
            (out_features, in_features),
            "weight",
            Init::Randn { mean: 0., stdev: 0.01 },
        )?;
        let b = vb.get_with_hints(out_features, "bias", Init::Const(0.))?;
        Ok(Classifier {
            linear: candle_nn::Linear::new(w, Some(b)),
            in_features,
            out_features,
            name: vb.prefix(),
        })
    }
    /// Number of classes.
    pub fn out_features(&self) -> usize {
        self.out_features
    }
    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }
    /// Applies the layer to (N, in_features).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.linear.forward(x)?)
    }
    /// Adds the layer's row to `t`.
    pub fn trace(&self, t: &mut Trace, input: &[usize]) -> Result<Vec<usize>> {
        let (c, out) = lean_ops::cost::linear_cost(self.in_features, self.out_features, true, input)?;
        Ok(t.push(&self.name, "linear", c, out))
    }
}
