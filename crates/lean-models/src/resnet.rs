//! ResNets (torchvision layout), their small-image variants, the classic CIFAR ResNets, and
//! the lean versions of all of them (every 3x3 conv inside the residual blocks lean).

use crate::layers::{
    stem_max_pool, trace_stem_max_pool, Classifier, Conv, Conv3x3Kind, ConvBnAct, LeanBranchStats, Trace,
};
use crate::model::Model;
use crate::registry::{Family, InputSpec, ModelEntry, ModelOption};
use crate::resnet_block::Block;
use crate::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;
use lean_ops::channels_last::{global_avg_pool_nhwc, to_channels_first, to_channels_last};
use lean_ops::{global_avg_pool2d, Activation};

/// Basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 with 4x expansion) residual blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// ResNet-18/34 and the CIFAR ResNets.
    Basic,
    /// ResNet-50/101.
    Bottleneck,
}

impl BlockKind {
    pub(crate) fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The stem: ImageNet (7x7 stride-2 conv, 3x3 stride-2 max-pool) or small-image (3x3 stride-1
/// conv, no pooling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stem {
    /// torchvision's stem, for 224x224 images.
    ImageNet,
    /// For 28x28 to 96x96 images (CIFAR, Fashion-MNIST, STL-10).
    Small,
}

/// Everything that defines a ResNet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResNetConfig {
    /// Block type.
    pub block: BlockKind,
    /// Blocks per stage.
    pub layers: Vec<usize>,
    /// Base width of each stage (output = width · expansion).
    pub widths: Vec<usize>,
    /// Stem layout.
    pub stem: Stem,
    /// Output channels of the stem conv.
    pub stem_width: usize,
    /// Dense or lean 3x3 convolutions in the blocks.
    pub conv: Conv3x3Kind,
    /// How many of the last stages use dilation instead of stride (0-2; segmentation backbones).
    pub dilate_last: usize,
    /// Input channels (1 for grey images).
    pub in_channels: usize,
    /// Classes.
    pub num_classes: usize,
    /// Build only the feature extractor (no pooling and classifier): a backbone.
    pub features_only: bool,
}

impl ResNetConfig {
    /// torchvision's ResNet of a given depth (18, 34, 50, 101).
    pub fn torchvision(depth: usize) -> Option<Self> {
        let (block, layers) = match depth {
            18 => (BlockKind::Basic, vec![2, 2, 2, 2]),
            34 => (BlockKind::Basic, vec![3, 4, 6, 3]),
            50 => (BlockKind::Bottleneck, vec![3, 4, 6, 3]),
            101 => (BlockKind::Bottleneck, vec![3, 4, 23, 3]),
            _ => return None,
        };
        Some(ResNetConfig {
            block,
            layers,
            widths: vec![64, 128, 256, 512],
            stem: Stem::ImageNet,
            stem_width: 64,
            conv: Conv3x3Kind::Dense,
            dilate_last: 0,
            in_channels: 3,
            num_classes: 1000,
            features_only: false,
        })
    }

    /// The classic CIFAR ResNet of depth 6n+2 (20, 32, 44, 56, 110): widths 16/32/64.
    pub fn cifar(depth: usize) -> Option<Self> {
        if depth < 8 || (depth - 2) % 6 != 0 {
            return None;
        }
        let n = (depth - 2) / 6;
        Some(ResNetConfig {
            block: BlockKind::Basic,
            layers: vec![n, n, n],
            widths: vec![16, 32, 64],
            stem: Stem::Small,
            stem_width: 16,
            conv: Conv3x3Kind::Dense,
            dilate_last: 0,
            in_channels: 3,
            num_classes: 10,
            features_only: false,
        })
    }
}

/// A ResNet (dense or lean) with torchvision's parameter names: `conv1`, `bn1`,
/// `layer{1..4}.{i}.conv{1,2,3}` / `bn{1,2,3}` / `downsample.{0,1}`, `fc`.
#[derive(Debug)]
pub struct ResNet {
    stem: ConvBnAct,
    stages: Vec<Vec<Block>>,
    fc: Option<Classifier>,
    cfg: ResNetConfig,
    channels_last: bool,
}

impl ResNet {
    /// Builds the network from `vb`.
    pub fn new(cfg: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.layers.is_empty() || cfg.layers.len() != cfg.widths.len() || cfg.layers.contains(&0) {
            return Err(crate::Error::Config {
                model: "ResNet".into(),
                msg: format!(
                    "needs one or more stages of one or more blocks, one width each; got blocks {:?}, widths {:?}",
                    cfg.layers, cfg.widths
                ),
            });
        }
        let (k, s) = match cfg.stem {
            Stem::ImageNet => (7, 2),
            Stem::Small => (3, 1),
        };
        let stem_conv = Conv::dense(cfg.in_channels, cfg.stem_width, k, s, 1, vb.pp("conv1"))?;
        let stem = ConvBnAct::new(
            stem_conv,
            cfg.stem_width,
            Activation::Relu,
            &vb.pp("conv1"),
            vb.pp("bn1"),
        )?;
        let mut inplanes = cfg.stem_width;
        let mut dilation = 1;
        let mut stages = vec![];
        let n_stages = cfg.layers.len();
        for (i, (&n, &width)) in cfg.layers.iter().zip(&cfg.widths).enumerate() {
            let mut stride = if i == 0 { 1 } else { 2 };
            let previous_dilation = dilation;
            if i > 0 && i + cfg.dilate_last >= n_stages {
                dilation *= stride;
                stride = 1;
            }
            let svb = vb.pp(format!("layer{}", i + 1));
            let mut blocks = vec![Block::new(
                cfg,
                inplanes,
                width,
                stride,
                previous_dilation,
                svb.pp("0"),
            )?];
            inplanes = width * cfg.block.expansion();
            for j in 1..n {
                blocks.push(Block::new(cfg, inplanes, width, 1, dilation, svb.pp(j.to_string()))?);
            }
            stages.push(blocks);
        }
        let fc = if cfg.features_only {
            None
        } else {
            Some(Classifier::new(inplanes, cfg.num_classes, vb.pp("fc"))?)
        };
        let mut net = ResNet {
            stem,
            stages,
            fc,
            cfg: cfg.clone(),
            channels_last: false,
        };
        net.channels_last =
            vb.device().is_cpu() && net.supports_channels_last() && crate::layout::channels_last_default();
        Ok(net)
    }

    /// Whether the blocks run channels-last (NHWC) inside: the input is converted once (before a
    /// 3x3 stem, which runs channels-last too; after an ImageNet stem's max-pool), and the pooled
    /// features (or, for [`Model::forward_features`], each stage's output) come back as the NCHW
    /// API expects. On by default on the CPU wherever every convolution in the blocks has an NHWC
    /// kernel (lean ResNets); `LEAN_LAYOUT=nchw` turns it off.
    pub fn channels_last(&self) -> bool {
        self.channels_last
    }

    /// Whether every block can run channels-last.
    pub fn supports_channels_last(&self) -> bool {
        self.stages.iter().flatten().all(|b| b.supports_nhwc())
    }

    /// Turns the channels-last inside on or off (same parameters, same results up to
    /// floating-point summation order); an error where a block has no NHWC kernel.
    pub fn set_channels_last(&mut self, on: bool) -> Result<()> {
        if on && !self.supports_channels_last() {
            return Err(crate::Error::Config {
                model: "resnet".into(),
                msg: "channels-last needs lean or 1x1 convolutions in every block (this one has dense 3x3 ones)".into(),
            });
        }
        self.channels_last = on;
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    /// Runs `x` through the network (train mode, as a fresh network is used) and reports, for
    /// every lean convolution in order, how its two branches share its output on the input it
    /// receives there: the diagnostic behind [`lean_ops::LeanInit`].
    pub fn lean_branch_stats(&self, x: &Tensor) -> Result<Vec<LeanBranchStats>> {
        let mut stats = vec![];
        let mut h = self.stem_forward(x, true)?;
        for b in self.stages.iter().flatten() {
            h = b.forward_probed(&h, true, false, Some(&mut stats))?;
        }
        Ok(stats)
    }

    /// Each stage's output, in the inner layout; with `nchw_out`, converted back to NCHW.
    fn run_stages(&self, x: &Tensor, train: bool, nchw_out: bool) -> Result<Vec<Tensor>> {
        let nhwc = self.channels_last;
        let mut h = match self.cfg.stem {
            Stem::Small => self.stem.forward_stem(x, train, nhwc)?,
            Stem::ImageNet if nhwc => to_channels_last(&self.stem_forward(x, train)?)?,
            Stem::ImageNet => self.stem_forward(x, train)?,
        };
        let mut out = vec![];
        for stage in &self.stages {
            for b in stage {
                h = b.forward_probed(&h, train, nhwc, None)?;
            }
            out.push(if nhwc && nchw_out {
                to_channels_first(&h)?
            } else {
                h.clone()
            });
        }
        Ok(out)
    }

    fn stem_forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.stem.forward_t(x, train)?;
        Ok(match self.cfg.stem {
            Stem::ImageNet => stem_max_pool(&h)?,
            Stem::Small => h,
        })
    }
}

impl Model for ResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let head = crate::model::head(&self.fc)?;
        let feats = self.run_stages(x, train, false)?;
        let last = feats.last().expect("a ResNet has stages");
        head.forward(&if self.channels_last {
            global_avg_pool_nhwc(last)?
        } else {
            global_avg_pool2d(last)?
        })
    }

    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        self.run_stages(x, train, true)
    }

    fn feature_channels(&self) -> Vec<usize> {
        self.cfg.widths.iter().map(|w| w * self.cfg.block.expansion()).collect()
    }

    fn trace_features(&self, input: &[usize], t: &mut Trace) -> Result<Vec<Vec<usize>>> {
        let mut s = self.stem.trace(t, input)?;
        if self.cfg.stem == Stem::ImageNet {
            s = trace_stem_max_pool(t, &s)?;
        }
        let mut out = vec![];
        for stage in &self.stages {
            for b in stage {
                s = b.trace(t, &s)?;
            }
            out.push(s.clone());
        }
        Ok(out)
    }

    fn trace(&self, input: &[usize], t: &mut Trace) -> Result<Vec<usize>> {
        let feats = self.trace_features(input, t)?;
        let s = feats.last().expect("stages");
        match &self.fc {
            Some(fc) => {
                let s = t.push("avgpool", "avgpool", Default::default(), vec![s[0], s[1]]);
                fc.trace(t, &s)
            }
            None => Ok(s.clone()),
        }
    }

    fn fold_batchnorm(&mut self) -> Result<()> {
        self.stem.fold_batchnorm()?;
        self.stages.iter_mut().flatten().try_for_each(|b| b.fold())
    }

    fn reset_classifier(&mut self, num_classes: usize, vb: VarBuilder) -> Result<()> {
        let in_features = *self.feature_channels().last().expect("stages");
        self.fc = Some(Classifier::new(in_features, num_classes, vb)?);
        self.cfg.num_classes = num_classes;
        Ok(())
    }

    fn num_classes(&self) -> usize {
        self.fc.as_ref().map_or(0, |f| f.out_features())
    }
}

/// The registry's ResNets: torchvision's 18/34/50/101 (ImageNet stem, and `_cifar` with the
/// small-image stem), the CIFAR ResNets 20-110, and `lean_` versions of all of them.
pub(crate) fn registry_entries() -> Vec<ModelEntry> {
    use ModelOption::*;
    let mut v = vec![];
    for lean in [false, true] {
        let mut named = vec![];
        for d in [18, 34, 50, 101] {
            for small in [false, true] {
                let suffix = if small { "_cifar" } else { "" };
                named.extend(ResNetConfig::torchvision(d).map(|c| (format!("resnet{d}{suffix}"), c, small)));
            }
        }
        for d in [20, 32, 44, 56, 110] {
            named.extend(ResNetConfig::cifar(d).map(|c| (format!("resnet{d}"), c, true)));
        }
        for (name, mut base, small) in named {
            if small {
                base.stem = Stem::Small;
                base.num_classes = 10;
            }
            let mut supports = vec![NumClasses, InChannels, DilateLast, FeaturesOnly];
            if lean {
                supports.extend(ModelOption::LEAN);
            }
            v.push(ModelEntry {
                name: if lean { format!("lean_{name}") } else { name },
                family: if lean { Family::LeanResNet } else { Family::ResNet },
                input: if small { InputSpec::SMALL } else { InputSpec::IMAGENET },
                num_classes: base.num_classes,
                segmentation: false,
                default_conv: if lean { Conv3x3Kind::lean() } else { Conv3x3Kind::Dense },
                supports,
                build: Box::new(move |a| {
                    let o = a.options;
                    let mut c = base.clone();
                    c.conv = a.conv;
                    c.in_channels = o.in_channels.unwrap_or(c.in_channels);
                    c.num_classes = o.num_classes.unwrap_or(c.num_classes);
                    c.features_only = o.features_only;
                    c.dilate_last = o.dilate_last.unwrap_or(0);
                    if c.dilate_last > 2 || c.dilate_last >= c.layers.len() {
                        return Err(crate::Error::Config {
                            model: a.name.into(),
                            msg: format!("dilate_last must be 0, 1 or 2, got {}", c.dilate_last),
                        });
                    }
                    Ok(Box::new(ResNet::new(&c, a.vb)?))
                }),
            });
        }
    }
    v
}
