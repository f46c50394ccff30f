//! ShuffleNetV2 in torchvision's layout (`conv1`, `stage{2,3,4}`, `conv5`, `fc`).

use crate::layers::{stem_max_pool, trace_stem_max_pool, Classifier, Conv, Conv3x3Kind, ConvBnAct, Trace};
use crate::model::Model;
use crate::registry::{Family, InputSpec, ModelEntry, ModelOption, BASE_OPTIONS};
use crate::{Error, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use lean_ops::channels_last::{concat_shuffle_nhwc, global_avg_pool_nhwc, to_channels_first, to_channels_last};
use lean_ops::{channel_shuffle, global_avg_pool2d, Activation, DepthwiseConv2d};

/// Everything that defines a ShuffleNetV2.
#[derive(Clone, Debug, PartialEq)]
pub struct ShuffleNetV2Config {
    /// Output channels of conv1, the three stages and conv5.
    pub stages_out_channels: [usize; 5],
    /// Blocks per stage.
    pub stages_repeats: [usize; 3],
    /// ImageNet stem (stride-2 conv1 + max-pool) or small-image stem (stride 1, no pool).
    pub small_stem: bool,
    /// Input channels.
    pub in_channels: usize,
    /// Classes.
    pub num_classes: usize,
}

impl ShuffleNetV2Config {
    /// torchvision's widths: 0.5, 1.0, 1.5 or 2.0.
    pub fn width(w: f64) -> Option<Self> {
        let ch = match w {
            w if w == 0.5 => [24, 48, 96, 192, 1024],
            w if w == 1.0 => [24, 116, 232, 464, 1024],
            w if w == 1.5 => [24, 176, 352, 704, 1024],
            w if w == 2.0 => [24, 244, 488, 976, 2048],
            _ => return None,
        };
        Some(ShuffleNetV2Config {
            stages_out_channels: ch,
            stages_repeats: [4, 8, 4],
            small_stem: false,
            in_channels: 3,
            num_classes: 1000,
        })
    }
}

#[derive(Debug)]
struct ShuffleBlock {
    branch1: Vec<ConvBnAct>,
    branch2: Vec<ConvBnAct>,
}

impl ShuffleBlock {
    fn new(inp: usize, oup: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let bf = oup / 2;
        let dw = |c: usize, v: VarBuilder| -> Result<Conv> {
            Ok(Conv::Depthwise(DepthwiseConv2d::new(c, 1, stride, 1, false, v)?))
        };
        let pw = |cin: usize, cout: usize, v: VarBuilder| Conv::dense(cin, cout, 1, 1, 1, v);
        // Sequential indices: conv at i, its BatchNorm at i + 1.
        let layer = |b: &VarBuilder, i: usize, conv: Conv, c: usize, act| {
            let cv = b.pp(i.to_string());
            ConvBnAct::new(conv, c, act, &cv, b.pp((i + 1).to_string()))
        };
        let mut branch1 = vec![];
        if stride > 1 {
            let b = vb.pp("branch1");
            branch1.push(layer(&b, 0, dw(inp, b.pp("0"))?, inp, Activation::None)?);
            branch1.push(layer(&b, 2, pw(inp, bf, b.pp("2"))?, bf, Activation::Relu)?);
        }
        let b = vb.pp("branch2");
        let cin = if stride > 1 { inp } else { bf };
        let branch2 = vec![
            layer(&b, 0, pw(cin, bf, b.pp("0"))?, bf, Activation::Relu)?,
            layer(&b, 3, dw(bf, b.pp("3"))?, bf, Activation::None)?,
            layer(&b, 5, pw(bf, bf, b.pp("5"))?, bf, Activation::Relu)?,
        ];
        Ok(ShuffleBlock { branch1, branch2 })
    }

    fn run(layers: &[ConvBnAct], x: &Tensor, train: bool, nhwc: bool) -> Result<Tensor> {
        layers.iter().try_fold(x.clone(), |h, l| l.forward_in(&h, train, nhwc))
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let out = if self.branch1.is_empty() {
            let c = x.dim(1)?;
            let (x1, x2) = (x.narrow(1, 0, c / 2)?, x.narrow(1, c / 2, c - c / 2)?);
            Tensor::cat(&[x1, Self::run(&self.branch2, &x2, train, false)?], 1)?
        } else {
            Tensor::cat(
                &[
                    Self::run(&self.branch1, x, train, false)?,
                    Self::run(&self.branch2, x, train, false)?,
                ],
                1,
            )?
        };
        Ok(channel_shuffle(&out, 2)?)
    }

    /// The block on a channels-last input: the split, both branches, and the concatenation
    /// with its channel shuffle in one pass (`concat_shuffle_nhwc`).
    fn forward_nhwc(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let run = |layers: &[ConvBnAct], x: &Tensor| Self::run(layers, x, train, true);
        let (a, b) = if self.branch1.is_empty() {
            let c = x.dim(3)?;
            let x2 = x.narrow(3, c / 2, c - c / 2)?.contiguous()?;
            (x.narrow(3, 0, c / 2)?, run(&self.branch2, &x2)?)
        } else {
            (run(&self.branch1, x)?, run(&self.branch2, x)?)
        };
        Ok(concat_shuffle_nhwc(&a, &b)?)
    }

    fn trace(&self, t: &mut Trace, input: &[usize]) -> Result<Vec<usize>> {
        let mut s2 = input.to_vec();
        if self.branch1.is_empty() {
            s2[1] /= 2;
        }
        let mut s1 = input.to_vec();
        for l in &self.branch1 {
            s1 = l.trace(t, &s1)?;
        }
        for l in &self.branch2 {
            s2 = l.trace(t, &s2)?;
        }
        let c = if self.branch1.is_empty() {
            input[1] - input[1] / 2
        } else {
            s1[1]
        };
        Ok(vec![s2[0], s2[1] + c, s2[2], s2[3]])
    }
}

/// ShuffleNetV2 (Ma et al. 2018) with torchvision's names.
#[derive(Debug)]
pub struct ShuffleNetV2 {
    conv1: ConvBnAct,
    stages: Vec<Vec<ShuffleBlock>>,
    conv5: ConvBnAct,
    fc: Classifier,
    cfg: ShuffleNetV2Config,
    channels_last: bool,
}

impl ShuffleNetV2 {
    /// Builds the network from `vb`.
    pub fn new(cfg: &ShuffleNetV2Config, vb: VarBuilder) -> Result<Self> {
        let ch = cfg.stages_out_channels;
        if ch[1..4].iter().any(|c| c % 2 != 0) {
            return Err(Error::Config {
                model: "shufflenet_v2".into(),
                msg: format!("stage widths must be even, got {ch:?}"),
            });
        }
        let stride = if cfg.small_stem { 1 } else { 2 };
        let cin = cfg.in_channels;
        let conv1 = ConvBnAct::sequential(
            |v| Conv::dense(cin, ch[0], 3, stride, 1, v),
            ch[0],
            Activation::Relu,
            &vb.pp("conv1"),
        )?;
        let mut inp = ch[0];
        let mut stages = vec![];
        for (i, &n) in cfg.stages_repeats.iter().enumerate() {
            let svb = vb.pp(format!("stage{}", i + 2));
            let oup = ch[i + 1];
            let mut blocks = vec![ShuffleBlock::new(inp, oup, 2, svb.pp("0"))?];
            for j in 1..n {
                blocks.push(ShuffleBlock::new(oup, oup, 1, svb.pp(j.to_string()))?);
            }
            stages.push(blocks);
            inp = oup;
        }
        let conv5 = ConvBnAct::sequential(
            |v| Conv::dense(inp, ch[4], 1, 1, 1, v),
            ch[4],
            Activation::Relu,
            &vb.pp("conv5"),
        )?;
        let fc = Classifier::new(ch[4], cfg.num_classes, vb.pp("fc"))?;
        Ok(ShuffleNetV2 {
            conv1,
            stages,
            conv5,
            fc,
            cfg: cfg.clone(),
            channels_last: vb.device().is_cpu() && crate::layout::channels_last_default(),
        })
    }

    /// Whether the stages and conv5 run channels-last (NHWC) inside: the input is converted once
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

    /// The stem's output and the stages' outputs, in the inner layout; with `nchw_out`, all in
    /// NCHW.
    fn run_stages(&self, x: &Tensor, train: bool, nchw_out: bool) -> Result<Vec<Tensor>> {
        let (stem, mut h) = match (self.channels_last, self.cfg.small_stem) {
            // The small stem has no max-pool: it runs channels-last itself where it can.
            (true, true) => {
                let h = self.conv1.forward_stem(x, train, true)?;
                (if nchw_out { to_channels_first(&h)? } else { h.clone() }, h)
            }
            (true, false) => {
                let stem = self.stem(x, train)?;
                let h = to_channels_last(&stem)?;
                (stem, h)
            }
            (false, _) => {
                let stem = self.stem(x, train)?;
                (stem.clone(), stem)
            }
        };
        let mut out = vec![stem];
        for stage in &self.stages {
            for b in stage {
                h = if self.channels_last {
                    b.forward_nhwc(&h, train)?
                } else {
                    b.forward_t(&h, train)?
                };
            }
            out.push(if self.channels_last && nchw_out {
                to_channels_first(&h)?
            } else {
                h.clone()
            });
        }
        Ok(out)
    }

    /// The configuration.
    pub fn config(&self) -> &ShuffleNetV2Config {
        &self.cfg
    }

    fn stem(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.conv1.forward_t(x, train)?;
        Ok(if self.cfg.small_stem { h } else { stem_max_pool(&h)? })
    }
}

impl Model for ShuffleNetV2 {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let feats = self.run_stages(x, train, false)?;
        let last = feats.last().expect("stages");
        let pooled = if self.channels_last {
            global_avg_pool_nhwc(&self.conv5.forward_t_nhwc(last, train)?)?
        } else {
            global_avg_pool2d(&self.conv5.forward_t(last, train)?)?
        };
        self.fc.forward(&pooled)
    }

    /// conv1 (after the max-pool, stride 4) and the three stages (8, 16, 32).
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        self.run_stages(x, train, true)
    }

    fn feature_channels(&self) -> Vec<usize> {
        self.cfg.stages_out_channels[..4].to_vec()
    }

    fn trace_features(&self, input: &[usize], t: &mut Trace) -> Result<Vec<Vec<usize>>> {
        let mut s = self.conv1.trace(t, input)?;
        if !self.cfg.small_stem {
            s = trace_stem_max_pool(t, &s)?;
        }
        let mut out = vec![s.clone()];
        for stage in &self.stages {
            for b in stage {
                s = b.trace(t, &s)?;
            }
            out.push(s.clone());
        }
        Ok(out)
    }

    fn trace(&self, input: &[usize], t: &mut Trace) -> Result<Vec<usize>> {
        let mut s = self.trace_features(input, t)?.pop().expect("stages");
        s = self.conv5.trace(t, &s)?;
        s = t.push("avgpool", "avgpool", Default::default(), vec![s[0], s[1]]);
        self.fc.trace(t, &s)
    }

    fn fold_batchnorm(&mut self) -> Result<()> {
        self.conv1.fold_batchnorm()?;
        self.conv5.fold_batchnorm()?;
        for b in self.stages.iter_mut().flatten() {
            b.branch1
                .iter_mut()
                .chain(b.branch2.iter_mut())
                .try_for_each(|l| l.fold_batchnorm())?;
        }
        Ok(())
    }

    fn reset_classifier(&mut self, num_classes: usize, vb: VarBuilder) -> Result<()> {
        self.fc = Classifier::new(self.fc.in_features(), num_classes, vb)?;
        self.cfg.num_classes = num_classes;
        Ok(())
    }

    fn num_classes(&self) -> usize {
        self.fc.out_features()
    }
}

/// The registry's ShuffleNetV2s: torchvision's widths x0.5-x2.0, each also with the
/// small-image stem (`_cifar`: stride-1 conv1, no max-pool, 10 classes).
pub(crate) fn registry_entries() -> Vec<ModelEntry> {
    let mut v = vec![];
    for (suffix, width) in [("x0_5", 0.5), ("x1_0", 1.0), ("x1_5", 1.5), ("x2_0", 2.0)] {
        for small in [false, true] {
            let mut supports = BASE_OPTIONS.to_vec();
            supports.push(ModelOption::Width);
            v.push(ModelEntry {
                name: format!("shufflenet_v2_{suffix}{}", if small { "_cifar" } else { "" }),
                family: Family::ShuffleNetV2,
                input: if small { InputSpec::SMALL } else { InputSpec::IMAGENET },
                num_classes: if small { 10 } else { 1000 },
                segmentation: false,
                default_conv: Conv3x3Kind::Dense,
                supports,
                build: Box::new(move |a| {
                    let o = a.options;
                    let w = o.width.unwrap_or(width);
                    let mut c = ShuffleNetV2Config::width(w).ok_or_else(|| Error::Config {
                        model: a.name.into(),
                        msg: format!("width must be 0.5, 1.0, 1.5 or 2.0, got {w}"),
                    })?;
                    c.small_stem = small;
                    c.in_channels = o.in_channels.unwrap_or(c.in_channels);
                    c.num_classes = o.num_classes.unwrap_or(if small { 10 } else { 1000 });
                    Ok(Box::new(ShuffleNetV2::new(&c, a.vb)?))
                }),
            });
        }
    }
    v
}
