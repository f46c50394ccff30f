//! MobileNetV2 in torchvision's layout (`features.*`, `classifier.1`), any width multiplier.

use crate::layers::{in_sample_chunks, Classifier, Conv, Conv3x3Kind, ConvBnAct, Trace};
use crate::model::Model;
use crate::registry::{Family, InputSpec, ModelEntry, ModelOption, BASE_OPTIONS};
use crate::{Error, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use lean_ops::channels_last::{global_avg_pool_nhwc, to_channels_first};
use lean_ops::fused::conv_chain_nhwc;
use lean_ops::{add_activation, global_avg_pool2d, Activation, DepthwiseConv2d};

/// Everything that defines a MobileNetV2.
#[derive(Clone, Debug, PartialEq)]
pub struct MobileNetV2Config {
    /// Width multiplier (0.35 to 1.4 in the paper).
    pub width: f64,
    /// Stride of the first conv: 2 (ImageNet) or 1 (small images).
    pub stem_stride: usize,
    /// Dropout before the classifier (torchvision: 0.2).
    pub dropout: f64,
    /// Input channels.
    pub in_channels: usize,
    /// Classes.
    pub num_classes: usize,
    /// Build only the feature extractor (no last 1x1 conv, pooling or classifier).
    pub features_only: bool,
}

impl Default for MobileNetV2Config {
    fn default() -> Self {
        MobileNetV2Config {
            width: 1.0,
            stem_stride: 2,
            dropout: 0.2,
            in_channels: 3,
            num_classes: 1000,
            features_only: false,
        }
    }
}

/// torchvision's `_make_divisible`: the nearest multiple of `d`, at least `d`, and not below
/// 90% of `v`.
pub fn make_divisible(v: f64, d: usize) -> usize {
    let mut n = d.max((v + d as f64 / 2.0) as usize / d * d);
    if (n as f64) < 0.9 * v {
        n += d;
    }
    n
}

/// (expansion t, channels c, repeats n, stride s) of each stage.
const SETTINGS: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

#[derive(Debug)]
struct InvertedResidual {
    layers: Vec<ConvBnAct>,
    residual: bool,
    /// Channels of the expanded tensor.
    hidden: usize,
}

impl InvertedResidual {
    fn new(inp: usize, oup: usize, stride: usize, t: usize, vb: VarBuilder) -> Result<Self> {
        let hidden = ((inp * t) as f64).round() as usize;
        let cvb = vb.pp("conv");
        let mut layers = vec![];
        let mut i = 0;
        if t != 1 {
            layers.push(ConvBnAct::sequential(
                |v| Conv::dense(inp, hidden, 1, 1, 1, v),
                hidden,
                Activation::Relu6,
                &cvb.pp("0"),
            )?);
            i = 1;
        }
        let dw = |v: VarBuilder| Ok(Conv::Depthwise(DepthwiseConv2d::new(hidden, 1, stride, 1, false, v)?));
        layers.push(ConvBnAct::sequential(
            dw,
            hidden,
            Activation::Relu6,
            &cvb.pp(i.to_string()),
        )?);
        let pw_vb = cvb.pp((i + 1).to_string());
        let pw = Conv::dense(hidden, oup, 1, 1, 1, pw_vb.clone())?;
        layers.push(ConvBnAct::new(
            pw,
            oup,
            Activation::None,
            &pw_vb,
            cvb.pp((i + 2).to_string()),
        )?);
        Ok(InvertedResidual {
            layers,
            residual: stride == 1 && inp == oup,
            hidden,
        })
    }

    /// The block on an NCHW input, or on a channels-last one with `nhwc`.
    fn forward_layout(&self, x: &Tensor, train: bool, nhwc: bool) -> Result<Tensor> {
        if !train && nhwc {
            // The expanded tensor (t times the input's channels) stays in cache: one sample at a
            // time through all the layers where the fused chain runs, else a chunk of samples
            // at a time through each layer.
            let chain: Option<Vec<_>> = self.layers.iter().map(ConvBnAct::chain_layer).collect();
            if let Some(chain) = chain {
                if let Some(y) = conv_chain_nhwc(x, &chain, self.residual)? {
                    return Ok(y);
                }
            }
            let (_, h, w, _) = x.dims4()?;
            return in_sample_chunks(x, h * w * self.hidden, |x| self.forward_block(x, train, nhwc));
        }
        self.forward_block(x, train, nhwc)
    }

    /// [`Self::forward_layout`] on the whole batch.
    fn forward_block(&self, x: &Tensor, train: bool, nhwc: bool) -> Result<Tensor> {
        let (last, first) = self.layers.split_last().expect("a block has layers");
        let mut h = x.clone();
        for l in first {
            h = l.forward_in(&h, train, nhwc)?;
        }
        if self.residual && nhwc {
            // bn(project(h)) + x as one op (fused at inference).
            return last.forward_residual_nhwc(&h, train, x, Activation::None);
        }
        h = last.forward_in(&h, train, nhwc)?;
        // Our fused op, not candle's add: one rayon pass each way (candle's elementwise ops run on
        // a second thread pool that competes with ours for the cores).
        Ok(if self.residual {
            add_activation(&h, x, Activation::None)?
        } else {
            h
        })
    }
}

/// MobileNetV2 (Sandler et al. 2018) with torchvision's names.
#[derive(Debug)]
pub struct MobileNetV2 {
    stem: ConvBnAct,
    blocks: Vec<InvertedResidual>,
    /// Index (into `blocks`) of the last block of each output stride, for features.
    stage_ends: Vec<usize>,
    stage_channels: Vec<usize>,
    head: Option<(ConvBnAct, Classifier)>,
    cfg: MobileNetV2Config,
    channels_last: bool,
}

impl MobileNetV2 {
    /// Builds the network from `vb`.
    pub fn new(cfg: &MobileNetV2Config, vb: VarBuilder) -> Result<Self> {
        if !(cfg.width > 0.0 && cfg.width <= 4.0) || !(0.0..1.0).contains(&cfg.dropout) {
            return Err(Error::Config {
                model: "mobilenet_v2".into(),
                msg: format!(
                    "width must be in (0, 4] and dropout in [0, 1), got {} and {}",
                    cfg.width, cfg.dropout
                ),
            });
        }
        let fvb = vb.pp("features");
        let mut inp = make_divisible(32.0 * cfg.width, 8);
        let last = make_divisible(1280.0 * cfg.width.max(1.0), 8);
        let (cin, s) = (cfg.in_channels, cfg.stem_stride);
        let stem = ConvBnAct::sequential(
            |v| Conv::dense(cin, inp, 3, s, 1, v),
            inp,
            Activation::Relu6,
            &fvb.pp("0"),
        )?;
        let mut blocks = vec![];
        let (mut stage_ends, mut stage_channels) = (vec![], vec![]);
        for (k, &(t, c, n, s)) in SETTINGS.iter().enumerate() {
            let oup = make_divisible(c as f64 * cfg.width, 8);
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                blocks.push(InvertedResidual::new(
                    inp,
                    oup,
                    stride,
                    t,
                    fvb.pp((blocks.len() + 1).to_string()),
                )?);
                inp = oup;
            }
            // A stage ends before the next stride-2 stage and at the end: strides 4, 8, 16, 32.
            let next_strided = SETTINGS.get(k + 1).is_none_or(|st| st.3 == 2);
            if k >= 1 && next_strided {
                stage_ends.push(blocks.len() - 1);
                stage_channels.push(oup);
            }
        }
        let head = if cfg.features_only {
            None
        } else {
            let head_vb = fvb.pp((blocks.len() + 1).to_string());
            let conv = ConvBnAct::sequential(
                |v| Conv::dense(inp, last, 1, 1, 1, v),
                last,
                Activation::Relu6,
                &head_vb,
            )?;
            Some((
                conv,
                Classifier::new(last, cfg.num_classes, vb.pp("classifier").pp("1"))?,
            ))
        };
        Ok(MobileNetV2 {
            stem,
            blocks,
            stage_ends,
            stage_channels,
            head,
            cfg: cfg.clone(),
            channels_last: vb.device().is_cpu() && crate::layout::channels_last_default(),
        })
    }

    /// Whether the blocks and the head run channels-last (NHWC) inside: the input is converted once
    /// (before a 3x3 stem, which runs channels-last too; after an ImageNet stem's max-pool), and
    /// the pooled features (or, for [`Model::forward_features`], each stage's output) come back as
    /// the NCHW API expects. On by default on the CPU; `LEAN_LAYOUT=nchw` turns it off.
    pub fn channels_last(&self) -> bool {
        self.channels_last
    }

    /// Turns the channels-last inside on or off (same parameters, same results up to
    /// floating-point summation order).
    pub fn set_channels_last(&mut self, on: bool) {
        self.channels_last = on;
    }

    /// The blocks after the stem, in the network's inner layout.
    fn block_forward(&self, b: &InvertedResidual, h: &Tensor, train: bool) -> Result<Tensor> {
        b.forward_layout(h, train, self.channels_last)
    }

    /// The configuration.
    pub fn config(&self) -> &MobileNetV2Config {
        &self.cfg
    }

    fn all_layers_mut(&mut self) -> impl Iterator<Item = &mut ConvBnAct> {
        std::iter::once(&mut self.stem)
            .chain(self.blocks.iter_mut().flat_map(|b| b.layers.iter_mut()))
            .chain(self.head.iter_mut().map(|(c, _)| c))
    }
}

impl Model for MobileNetV2 {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (conv, classifier) = crate::model::head(&self.head)?;
        let mut h = self.stem.forward_stem(x, train, self.channels_last)?;
        for b in &self.blocks {
            h = self.block_forward(b, &h, train)?;
        }
        h = if self.channels_last {
            global_avg_pool_nhwc(&conv.forward_t_nhwc(&h, train)?)?
        } else {
            global_avg_pool2d(&conv.forward_t(&h, train)?)?
        };
        if train && self.cfg.dropout > 0.0 {
            h = lean_ops::random::dropout(&h, self.cfg.dropout)?;
        }
        classifier.forward(&h)
    }

    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let mut h = self.stem.forward_stem(x, train, self.channels_last)?;
        let mut out = vec![];
        for (i, b) in self.blocks.iter().enumerate() {
            h = self.block_forward(b, &h, train)?;
            if self.stage_ends.contains(&i) {
                out.push(if self.channels_last {
                    to_channels_first(&h)?
                } else {
                    h.clone()
                });
            }
        }
        Ok(out)
    }

    fn feature_channels(&self) -> Vec<usize> {
        self.stage_channels.clone()
    }

    fn trace_features(&self, input: &[usize], t: &mut Trace) -> Result<Vec<Vec<usize>>> {
        let mut s = self.stem.trace(t, input)?;
        let mut out = vec![];
        for (i, b) in self.blocks.iter().enumerate() {
            for l in &b.layers {
                s = l.trace(t, &s)?;
            }
            if self.stage_ends.contains(&i) {
                out.push(s.clone());
            }
        }
        Ok(out)
    }

    fn trace(&self, input: &[usize], t: &mut Trace) -> Result<Vec<usize>> {
        // The last block ends the last stage.
        let mut s = self.trace_features(input, t)?.pop().expect("stages");
        match &self.head {
            Some((conv, classifier)) => {
                s = conv.trace(t, &s)?;
                s = t.push("avgpool", "avgpool", Default::default(), vec![s[0], s[1]]);
                classifier.trace(t, &s)
            }
            None => Ok(s),
        }
    }

    fn fold_batchnorm(&mut self) -> Result<()> {
        self.all_layers_mut().try_for_each(|l| l.fold_batchnorm())
    }

    fn reset_classifier(&mut self, num_classes: usize, vb: VarBuilder) -> Result<()> {
        let Some((_, classifier)) = &mut self.head else {
            return Err(crate::Error::Config {
                model: "mobilenet_v2".into(),
                msg: "built features-only: no classifier to replace".into(),
            });
        };
        *classifier = Classifier::new(classifier.in_features(), num_classes, vb)?;
        self.cfg.num_classes = num_classes;
        Ok(())
    }

    fn num_classes(&self) -> usize {
        self.head.as_ref().map_or(0, |(_, c)| c.out_features())
    }
}

/// The registry's MobileNetV2s: widths 0.35-1.4 (`mobilenet_v2[_035|_050|_075|_140]`), each
/// also with the small-image stem (`_cifar`: stride-1 first conv, 10 classes).
pub(crate) fn registry_entries() -> Vec<ModelEntry> {
    let mut v = vec![];
    for (suffix, width) in [("", 1.0), ("_035", 0.35), ("_050", 0.5), ("_075", 0.75), ("_140", 1.4)] {
        for small in [false, true] {
            let mut base = MobileNetV2Config {
                width,
                ..Default::default()
            };
            if small {
                base.stem_stride = 1;
                base.num_classes = 10;
            }
            let mut supports = BASE_OPTIONS.to_vec();
            supports.extend([ModelOption::Width, ModelOption::FeaturesOnly]);
            v.push(ModelEntry {
                name: format!("mobilenet_v2{suffix}{}", if small { "_cifar" } else { "" }),
                family: Family::MobileNetV2,
                input: if small { InputSpec::SMALL } else { InputSpec::IMAGENET },
                num_classes: base.num_classes,
                segmentation: false,
                default_conv: Conv3x3Kind::Dense,
                supports,
                build: Box::new(move |a| {
                    let o = a.options;
                    let c = MobileNetV2Config {
                        width: o.width.unwrap_or(base.width),
                        in_channels: o.in_channels.unwrap_or(base.in_channels),
                        num_classes: o.num_classes.unwrap_or(base.num_classes),
                        features_only: o.features_only,
                        ..base.clone()
                    };
                    Ok(Box::new(MobileNetV2::new(&c, a.vb)?))
                }),
            });
        }
    }
    v
}
