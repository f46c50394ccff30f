//! One residual block of a (lean) ResNet: basic (two 3x3) or bottleneck (1x1, 3x3, 1x1), with
//! its projection shortcut, in NCHW or channels-last.

use crate::layers::{Conv, ConvBnAct, LeanBranchStats, Trace};
use crate::resnet::{BlockKind, ResNetConfig};
use crate::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;
use lean_ops::{add_activation, Activation};

/// One residual block.
#[derive(Debug)]
pub(crate) struct Block {
    convs: Vec<ConvBnAct>,
    downsample: Option<ConvBnAct>,
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: &ResNetConfig,
        inplanes: usize,
        planes: usize,
        stride: usize,
        dilation: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let out = planes * cfg.block.expansion();
        let cba = |conv: Conv, c: usize, act, i: usize| {
            ConvBnAct::new(conv, c, act, &vb.pp(format!("conv{i}")), vb.pp(format!("bn{i}")))
        };
        let convs = match cfg.block {
            BlockKind::Basic => vec![
                cba(
                    Conv::conv3x3(cfg.conv, inplanes, planes, stride, dilation, vb.pp("conv1"))?,
                    planes,
                    Activation::Relu,
                    1,
                )?,
                cba(
                    Conv::conv3x3(cfg.conv, planes, planes, 1, dilation, vb.pp("conv2"))?,
                    planes,
                    Activation::None,
                    2,
                )?,
            ],
            BlockKind::Bottleneck => vec![
                cba(
                    Conv::dense(inplanes, planes, 1, 1, 1, vb.pp("conv1"))?,
                    planes,
                    Activation::Relu,
                    1,
                )?,
                cba(
                    Conv::conv3x3(cfg.conv, planes, planes, stride, dilation, vb.pp("conv2"))?,
                    planes,
                    Activation::Relu,
                    2,
                )?,
                cba(
                    Conv::dense(planes, out, 1, 1, 1, vb.pp("conv3"))?,
                    out,
                    Activation::None,
                    3,
                )?,
            ],
        };
        let downsample = if stride != 1 || inplanes != out {
            let dvb = vb.pp("downsample");
            let c = Conv::dense(inplanes, out, 1, stride, 1, dvb.pp("0"))?;
            Some(ConvBnAct::new(c, out, Activation::None, &dvb.pp("0"), dvb.pp("1"))?)
        } else {
            None
        };
        Ok(Block { convs, downsample })
    }

    /// The forward pass on an NCHW input, or on a channels-last one with `nhwc` (see
    /// [`ResNet::channels_last`]); with `probe` (NCHW only), each lean convolution's branch
    /// statistics are recorded.
    pub(crate) fn forward_probed(
        &self,
        x: &Tensor,
        train: bool,
        nhwc: bool,
        mut probe: Option<&mut Vec<LeanBranchStats>>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        let (last, first) = self.convs.split_last().expect("a block has convolutions");
        for c in first {
            if let Some(stats) = probe.as_deref_mut() {
                stats.extend(c.lean_branch_stats(&h)?);
            }
            h = c.forward_in(&h, train, nhwc)?;
        }
        if let Some(stats) = probe {
            stats.extend(last.lean_branch_stats(&h)?);
        }
        let shortcut = match &self.downsample {
            Some(d) => d.forward_in(x, train, nhwc)?,
            None => x.clone(),
        };
        if nhwc {
            // relu(bn(conv(h)) + shortcut) as one op (fused at inference).
            return last.forward_residual_nhwc(&h, train, &shortcut, Activation::Relu);
        }
        Ok(add_activation(
            &last.forward_t(&h, train)?,
            &shortcut,
            Activation::Relu,
        )?)
    }

    pub(crate) fn supports_nhwc(&self) -> bool {
        self.convs.iter().chain(&self.downsample).all(|c| c.supports_nhwc())
    }

    pub(crate) fn trace(&self, t: &mut Trace, input: &[usize]) -> Result<Vec<usize>> {
        let mut s = input.to_vec();
        for c in &self.convs {
            s = c.trace(t, &s)?;
        }
        if let Some(d) = &self.downsample {
            d.trace(t, input)?;
        }
        Ok(s)
    }

    pub(crate) fn fold(&mut self) -> Result<()> {
        self.convs
            .iter_mut()
            .chain(self.downsample.iter_mut())
            .try_for_each(|c| c.fold_batchnorm())
    }
}
