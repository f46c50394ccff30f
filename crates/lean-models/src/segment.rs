//! Semantic segmentation: a registered backbone's stage features and a decoder whose 3x3
//! convolutions are lean (or dense): an FPN-style top-down path, or a DeepLabV3-style ASPP head
//! (docs/ARCHITECTURE.md). Logits are upsampled bilinearly to the input size.

use crate::layers::{Conv, Conv3x3Kind, ConvBnAct, Trace};
use crate::model::Model;
use crate::registry::{BuildArgs, Family, InputSpec, ModelEntry, ModelOption};
use crate::{ModelOptions, Result};
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use lean_ops::{global_avg_pool2d, upsample_bilinear2d, Activation, Conv2d, Conv2dConfig, Cost, CostModel};

/// The decoder type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegHead {
    /// Lateral 1x1, upsample + add, 3x3 smoothing down to the shallowest feature.
    Fpn,
    /// Atrous spatial pyramid pooling on the deepest feature.
    Aspp,
}

/// Decoder settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SegDecoderConfig {
    /// Decoder type.
    pub head: SegHead,
    /// Channels inside the decoder.
    pub channels: usize,
    /// Dense or lean 3x3 convolutions.
    pub conv: Conv3x3Kind,
    /// ASPP dilation rates (6/12/18 for large images, 2/4/6 for small ones).
    pub rates: [usize; 3],
    /// Classes (background included).
    pub num_classes: usize,
}

#[derive(Debug)]
enum Decoder {
    Fpn {
        lateral: Vec<ConvBnAct>,
        smooth: Vec<ConvBnAct>,
    },
    Aspp {
        branches: Vec<ConvBnAct>,
        pool: ConvBnAct,
        project: ConvBnAct,
        head: ConvBnAct,
    },
}

/// A backbone with a segmentation decoder. Names: `backbone.*`, `decoder.*`.
#[derive(Debug)]
pub struct SegmentationModel {
    backbone: Box<dyn Model>,
    decoder: Decoder,
    classifier: Conv2d,
    cfg: SegDecoderConfig,
}

fn cba(conv: Conv, c: usize, act: Activation, vb: &VarBuilder) -> Result<ConvBnAct> {
    ConvBnAct::new(conv, c, act, &vb.pp("0"), vb.pp("1"))
}

impl SegmentationModel {
    /// Puts a decoder on `backbone` (built features-only) with weights from `vb` (`decoder.*`).
    pub fn new(backbone: Box<dyn Model>, cfg: &SegDecoderConfig, vb: VarBuilder) -> Result<Self> {
        let chans = backbone.feature_channels();
        if chans.is_empty() {
            return Err(crate::Error::Config {
                model: "SegmentationModel".into(),
                msg: "the backbone reports no feature stages (build it with features_only)".into(),
            });
        }
        let d = cfg.channels;
        let dvb = vb.pp("decoder");
        let decoder = match cfg.head {
            SegHead::Fpn => {
                let mut lateral = vec![];
                for (i, &c) in chans.iter().enumerate() {
                    let v = dvb.pp("lateral").pp(i.to_string());
                    lateral.push(cba(Conv::dense(c, d, 1, 1, 1, v.pp("0"))?, d, Activation::None, &v)?);
                }
                let mut smooth = vec![];
                for i in 0..chans.len().saturating_sub(1) {
                    let v = dvb.pp("smooth").pp(i.to_string());
                    smooth.push(cba(
                        Conv::conv3x3(cfg.conv, d, d, 1, 1, v.pp("0"))?,
                        d,
                        Activation::Relu,
                        &v,
                    )?);
                }
                Decoder::Fpn { lateral, smooth }
            }
            SegHead::Aspp => {
                let c = chans[chans.len() - 1];
                let b = dvb.pp("aspp");
                let mut branches = vec![cba(
                    Conv::dense(c, d, 1, 1, 1, b.pp("0").pp("0"))?,
                    d,
                    Activation::Relu,
                    &b.pp("0"),
                )?];
                for (k, &r) in cfg.rates.iter().enumerate() {
                    let v = b.pp((k + 1).to_string());
                    branches.push(cba(
                        Conv::conv3x3(cfg.conv, c, d, 1, r, v.pp("0"))?,
                        d,
                        Activation::Relu,
                        &v,
                    )?);
                }
                let pool = cba(
                    Conv::dense(c, d, 1, 1, 1, b.pp("pool").pp("0"))?,
                    d,
                    Activation::Relu,
                    &b.pp("pool"),
                )?;
                let pv = dvb.pp("project");
                let project = cba(Conv::dense(5 * d, d, 1, 1, 1, pv.pp("0"))?, d, Activation::Relu, &pv)?;
                let hv = dvb.pp("head");
                let head = cba(
                    Conv::conv3x3(cfg.conv, d, d, 1, 1, hv.pp("0"))?,
                    d,
                    Activation::Relu,
                    &hv,
                )?;
                Decoder::Aspp {
                    branches,
                    pool,
                    project,
                    head,
                }
            }
        };
        let classifier = Conv2d::new(
            Conv2dConfig::new(d, cfg.num_classes, 1).bias(true),
            dvb.pp("classifier"),
        )?;
        Ok(SegmentationModel {
            backbone,
            decoder,
            classifier,
            cfg: cfg.clone(),
        })
    }

    /// The decoder settings.
    pub fn config(&self) -> &SegDecoderConfig {
        &self.cfg
    }

    fn decode(&self, feats: &[Tensor], train: bool) -> Result<Tensor> {
        Ok(match &self.decoder {
            Decoder::Fpn { lateral, smooth } => {
                let n = feats.len();
                let mut p = lateral[n - 1].forward_t(&feats[n - 1], train)?;
                for i in (0..n - 1).rev() {
                    let (_, _, h, w) = feats[i].dims4()?;
                    let up = upsample_bilinear2d(&p, h, w, false)?;
                    p = smooth[i].forward_t(&(up + lateral[i].forward_t(&feats[i], train)?)?, train)?;
                }
                p
            }
            Decoder::Aspp {
                branches,
                pool,
                project,
                head,
            } => {
                let x = feats.last().expect("features");
                let (n, c, h, w) = x.dims4()?;
                let mut outs = branches
                    .iter()
                    .map(|b| b.forward_t(x, train))
                    .collect::<Result<Vec<_>>>()?;
                let pooled = pool.forward_t(&global_avg_pool2d(x)?.reshape((n, c, 1, 1))?, train)?;
                outs.push(upsample_bilinear2d(&pooled, h, w, false)?);
                head.forward_t(&project.forward_t(&Tensor::cat(&outs, 1)?, train)?, train)?
            }
        })
    }

    fn decoder_layers_mut(&mut self) -> Vec<&mut ConvBnAct> {
        match &mut self.decoder {
            Decoder::Fpn { lateral, smooth } => lateral.iter_mut().chain(smooth.iter_mut()).collect(),
            Decoder::Aspp {
                branches,
                pool,
                project,
                head,
            } => branches.iter_mut().chain([pool, project, head]).collect(),
        }
    }
}

impl Model for SegmentationModel {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let feats = self.backbone.forward_features(x, train)?;
        let logits = self.classifier.forward(&self.decode(&feats, train)?)?;
        Ok(upsample_bilinear2d(&logits, h, w, false)?)
    }

    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        self.backbone.forward_features(x, train)
    }

    fn feature_channels(&self) -> Vec<usize> {
        self.backbone.feature_channels()
    }

    fn trace_features(&self, input: &[usize], t: &mut Trace) -> Result<Vec<Vec<usize>>> {
        self.backbone.trace_features(input, t)
    }

    fn trace(&self, input: &[usize], t: &mut Trace) -> Result<Vec<usize>> {
        let feats = self.backbone.trace_features(input, t)?;
        let s = match &self.decoder {
            Decoder::Fpn { lateral, smooth } => {
                let n = feats.len();
                let mut p = lateral[n - 1].trace(t, &feats[n - 1])?;
                for i in (0..n - 1).rev() {
                    lateral[i].trace(t, &feats[i])?;
                    p = smooth[i].trace(t, &[p[0], p[1], feats[i][2], feats[i][3]])?;
                }
                p
            }
            Decoder::Aspp {
                branches,
                pool,
                project,
                head,
            } => {
                let x = feats.last().expect("features");
                for b in branches {
                    b.trace(t, x)?;
                }
                pool.trace(t, &[x[0], x[1], 1, 1])?;
                let s = project.trace(t, &[x[0], 5 * self.cfg.channels, x[2], x[3]])?;
                head.trace(t, &s)?
            }
        };
        let (c, s) = self.classifier.cost(&s)?;
        let s = t.push("decoder.classifier", "conv1x1", c, s);
        Ok(t.push(
            "upsample",
            "upsample",
            Cost::default(),
            vec![s[0], s[1], input[2], input[3]],
        ))
    }

    fn fold_batchnorm(&mut self) -> Result<()> {
        self.backbone.fold_batchnorm()?;
        self.decoder_layers_mut()
            .into_iter()
            .try_for_each(|l| l.fold_batchnorm())
    }

    fn reset_classifier(&mut self, num_classes: usize, vb: VarBuilder) -> Result<()> {
        self.classifier = Conv2d::new(Conv2dConfig::new(self.cfg.channels, num_classes, 1).bias(true), vb)?;
        self.cfg.num_classes = num_classes;
        Ok(())
    }

    fn num_classes(&self) -> usize {
        self.cfg.num_classes
    }

    fn is_segmentation(&self) -> bool {
        true
    }
}

/// Backbones registered with the segmentation heads: (name, family, small-image).
const SEG_BACKBONES: [(&str, Family, bool); 8] = [
    ("resnet18", Family::ResNet, false),
    ("lean_resnet18", Family::LeanResNet, false),
    ("resnet18_cifar", Family::ResNet, true),
    ("lean_resnet18_cifar", Family::LeanResNet, true),
    ("resnet20", Family::ResNet, true),
    ("lean_resnet20", Family::LeanResNet, true),
    ("mobilenet_v2", Family::MobileNetV2, false),
    ("mobilenet_v2_cifar", Family::MobileNetV2, true),
];

/// The registry's segmentation models `[lean_]{fpn,deeplabv3}_<backbone>`: the decoder's 3x3s
/// are lean when the name starts with `lean_` or the backbone is lean (whose knobs and tag the
/// decoder shares). Small-image backbones give 64x64 inputs and 11 classes (the Fashion-MNIST
/// segmentation set), the others 512x512 and 21 (VOC).
pub(crate) fn registry_entries() -> Vec<ModelEntry> {
    use ModelOption::*;
    let mut v = vec![];
    for (head, head_name) in [(SegHead::Fpn, "fpn"), (SegHead::Aspp, "deeplabv3")] {
        for (bb, family, small) in SEG_BACKBONES {
            let bb_lean = family == Family::LeanResNet;
            let decoders: &[bool] = if bb_lean { &[false] } else { &[false, true] };
            for &lean_prefix in decoders {
                let lean = lean_prefix || bb_lean;
                let mut supports = vec![NumClasses, InChannels];
                if family == Family::MobileNetV2 {
                    supports.push(Width);
                }
                if lean {
                    supports.extend([Stencil, GroupSize, LeanInit]);
                }
                if bb_lean {
                    supports.push(DenseDownsample);
                }
                let base = if small { InputSpec::SMALL } else { InputSpec::IMAGENET };
                v.push(ModelEntry {
                    name: format!("{}{head_name}_{bb}", if lean_prefix { "lean_" } else { "" }),
                    family,
                    input: if small { base.at(64, 64) } else { base.at(512, 512) },
                    num_classes: if small { 11 } else { 21 },
                    segmentation: true,
                    default_conv: if lean { Conv3x3Kind::lean() } else { Conv3x3Kind::Dense },
                    supports,
                    build: Box::new(move |a| build_segmentation(a, head, bb, bb_lean, small)),
                });
            }
        }
    }
    v
}

fn build_segmentation(a: BuildArgs, head: SegHead, bb: &str, bb_lean: bool, small: bool) -> Result<Box<dyn Model>> {
    let o = a.options;
    let mut bopts = ModelOptions {
        features_only: true,
        width: o.width,
        in_channels: o.in_channels,
        ..Default::default()
    };
    if bb_lean {
        (bopts.stencil, bopts.group_size, bopts.dense_downsample, bopts.lean_init) =
            (o.stencil, o.group_size, o.dense_downsample, o.lean_init);
    }
    // DeepLabV3 keeps the ImageNet-stem ResNets at output stride 8 with dilation.
    if head == SegHead::Aspp && !small && bb.contains("resnet") {
        bopts.dilate_last = Some(2);
    }
    let bb_name = if bb_lean && !a.tag.is_empty() {
        format!("{bb}.{}", a.tag)
    } else {
        bb.to_string()
    };
    let backbone = crate::create_model(&bb_name, &bopts, a.vb.pp("backbone"))?;
    let cfg = SegDecoderConfig {
        head,
        channels: if small { 32 } else { 256 },
        conv: a.conv,
        rates: if small { [2, 4, 6] } else { [6, 12, 18] },
        num_classes: o.num_classes.unwrap_or(if small { 11 } else { 21 }),
    };
    Ok(Box::new(SegmentationModel::new(backbone, &cfg, a.vb)?))
}
