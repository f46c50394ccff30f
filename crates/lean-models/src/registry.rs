//! The model registry: every architecture by name, timm-style `arch.tag` presets for the lean
//! knobs, descriptions, and creation with options.
//!
//! Tags (lean models only) are `_`-separated tokens: a stencil (`five`, `four`, `h3`, `v3`,
//! `full`), a group size `g<N>`, `dd` for dense downsampling, and an initialisation of new lean
//! weights (`balanced`, the default, or `fanout`), e.g. `lean_resnet18.four_g2`.

use crate::layers::Conv3x3Kind;
use crate::mobilenet_v2::{MobileNetV2, MobileNetV2Config};
use crate::model::Model;
use crate::resnet::{ResNet, ResNetConfig, Stem};
use crate::shufflenet_v2::{ShuffleNetV2, ShuffleNetV2Config};
use crate::{Error, ModelOptions, Result};
use candle_nn::VarBuilder;
use lean_ops::{LeanInit, Stencil};

/// The model families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Dense ResNets.
    ResNet,
    /// Lean ResNets.
    LeanResNet,
    /// MobileNetV2.
    MobileNetV2,
    /// ShuffleNetV2.
    ShuffleNetV2,
}

impl Family {
    /// The family's name in tables and CSV files.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::ResNet => "resnet",
            Family::LeanResNet => "lean_resnet",
            Family::MobileNetV2 => "mobilenet_v2",
            Family::ShuffleNetV2 => "shufflenet_v2",
        }
    }
}

/// What the registry says about a model name.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// The registered name (with its tag, if one was given).
    pub name: String,
    /// The family.
    pub family: Family,
    /// Default input size (C, H, W).
    pub input_size: [usize; 3],
    /// Normalisation mean per channel.
    pub mean: [f32; 3],
    /// Normalisation std per channel.
    pub std: [f32; 3],
    /// Default number of classes.
    pub num_classes: usize,
    /// Whether it is a segmentation model (per-pixel logits).
    pub segmentation: bool,
}

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
const CIFAR_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
const CIFAR_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];

/// Every registered architecture name (without tags).
pub fn model_names() -> Vec<String> {
    let mut v = vec![];
    for lean in ["", "lean_"] {
        for d in [18, 34, 50, 101] {
            v.push(format!("{lean}resnet{d}"));
            v.push(format!("{lean}resnet{d}_cifar"));
        }
        for d in [20, 32, 44, 56, 110] {
            v.push(format!("{lean}resnet{d}"));
        }
    }
    for w in ["", "_035", "_050", "_075", "_140"] {
        v.push(format!("mobilenet_v2{w}"));
        v.push(format!("mobilenet_v2{w}_cifar"));
    }
    for w in ["x0_5", "x1_0", "x1_5", "x2_0"] {
        v.push(format!("shufflenet_v2_{w}"));
        v.push(format!("shufflenet_v2_{w}_cifar"));
    }
    for head in ["fpn", "deeplabv3"] {
        for bb in SEG_BACKBONES {
            v.push(format!("{head}_{bb}"));
            if !bb.starts_with("lean_") {
                v.push(format!("lean_{head}_{bb}"));
            }
        }
    }
    v
}

/// Backbones registered with segmentation heads (any ResNet or MobileNetV2 name works).
const SEG_BACKBONES: [&str; 8] = [
    "resnet18",
    "lean_resnet18",
    "resnet18_cifar",
    "lean_resnet18_cifar",
    "resnet20",
    "lean_resnet20",
    "mobilenet_v2",
    "mobilenet_v2_cifar",
];

/// A segmentation name: (head, lean decoder, backbone name).
fn parse_seg(arch: &str) -> Option<(crate::segment::SegHead, bool, String)> {
    let (lean_dec, rest) = match arch.strip_prefix("lean_") {
        Some(r) => (true, r),
        None => (false, arch),
    };
    let (head, bb) = if let Some(b) = rest.strip_prefix("fpn_") {
        (crate::segment::SegHead::Fpn, b)
    } else if let Some(b) = rest.strip_prefix("deeplabv3_") {
        (crate::segment::SegHead::Aspp, b)
    } else {
        return None;
    };
    match parse_arch(bb)? {
        (Arch::ResNet(_) | Arch::MobileNetV2(_), bb_lean, _) => Some((head, lean_dec || bb_lean, bb.to_string())),
        _ => None,
    }
}

/// Shell-style match with `*` and `?`.
fn glob(pattern: &str, s: &str) -> bool {
    fn go(p: &[char], s: &[char]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], s) || (!s.is_empty() && go(p, &s[1..])),
            (Some('?'), Some(_)) => go(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &s[1..]),
            _ => false,
        }
    }
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    go(&p, &s)
}

/// The registered models whose names match `pattern` (`*`, `?`; no pattern: all).
pub fn list_models(pattern: Option<&str>) -> Vec<ModelInfo> {
    model_names()
        .into_iter()
        .filter(|n| pattern.is_none_or(|p| glob(p, n) || (!p.contains(['*', '?']) && n.contains(p))))
        .map(|n| describe(&n).expect("registered names describe"))
        .collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn unknown(name: &str) -> Error {
    let mut scored: Vec<(usize, String)> = model_names()
        .into_iter()
        .map(|n| (edit_distance(name, &n), n))
        .collect();
    scored.sort();
    let suggestions = scored
        .into_iter()
        .filter(|(d, _)| *d <= 4)
        .take(3)
        .map(|(_, n)| n)
        .collect();
    Error::UnknownModel {
        name: name.to_string(),
        suggestions,
    }
}

/// Architecture parsed from a name.
enum Arch {
    ResNet(ResNetConfig),
    MobileNetV2(MobileNetV2Config),
    ShuffleNetV2(ShuffleNetV2Config),
}

fn parse_arch(arch: &str) -> Option<(Arch, bool, bool)> {
    let (lean, rest) = match arch.strip_prefix("lean_") {
        Some(r) => (true, r),
        None => (false, arch),
    };
    let (small, base) = match rest.strip_suffix("_cifar") {
        Some(b) => (true, b),
        None => (false, rest),
    };
    if let Some(d) = base.strip_prefix("resnet").and_then(|d| d.parse::<usize>().ok()) {
        let mut cfg = match (d, small) {
            (18 | 34 | 50 | 101, _) => ResNetConfig::torchvision(d)?,
            (20 | 32 | 44 | 56 | 110, false) => ResNetConfig::cifar(d)?,
            _ => return None,
        };
        if small {
            cfg.stem = Stem::Small;
            cfg.num_classes = 10;
        }
        if lean {
            cfg.conv = Conv3x3Kind::lean();
        }
        return Some((
            Arch::ResNet(cfg),
            lean,
            small || d < 18 || d == 20 || d == 32 || d == 44 || d == 56 || d == 110,
        ));
    }
    if lean {
        return None;
    }
    if let Some(w) = base.strip_prefix("mobilenet_v2") {
        let width = match w {
            "" => 1.0,
            "_035" => 0.35,
            "_050" => 0.5,
            "_075" => 0.75,
            "_140" => 1.4,
            _ => return None,
        };
        let mut cfg = MobileNetV2Config {
            width,
            ..Default::default()
        };
        if small {
            cfg.stem_stride = 1;
            cfg.num_classes = 10;
        }
        return Some((Arch::MobileNetV2(cfg), false, small));
    }
    if let Some(w) = base.strip_prefix("shufflenet_v2_x") {
        let width = match w {
            "0_5" => 0.5,
            "1_0" => 1.0,
            "1_5" => 1.5,
            "2_0" => 2.0,
            _ => return None,
        };
        let mut cfg = ShuffleNetV2Config::width(width)?;
        if small {
            cfg.small_stem = true;
            cfg.num_classes = 10;
        }
        return Some((Arch::ShuffleNetV2(cfg), false, small));
    }
    None
}

/// Applies a tag's knobs to a lean 3x3 kind.
fn apply_tag(name: &str, tag: &str, kind: &mut Conv3x3Kind) -> Result<()> {
    let Conv3x3Kind::Lean {
        stencil,
        group_size,
        dense_downsample,
        init,
    } = kind
    else {
        return Err(Error::Config {
            model: name.into(),
            msg: format!("tag `{tag}`: only lean models take tags"),
        });
    };
    for tok in tag.split('_') {
        if let Ok(s) = tok.parse::<Stencil>() {
            *stencil = s;
        } else if let Some(g) = tok.strip_prefix('g').and_then(|g| g.parse().ok()) {
            *group_size = g;
        } else if tok == "dd" {
            *dense_downsample = true;
        } else if let Ok(i) = tok.parse::<LeanInit>() {
            *init = i;
        } else {
            return Err(Error::Config {
                model: name.into(),
                msg: format!("unknown tag token `{tok}` (expected a stencil, g<N>, dd, balanced or fanout)"),
            });
        }
    }
    Ok(())
}

/// Describes `name` (`arch` or `arch.tag`).
pub fn describe(name: &str) -> Result<ModelInfo> {
    let (arch, tag) = name.split_once('.').unwrap_or((name, ""));
    if let Some((_, lean_dec, bb)) = parse_seg(arch) {
        if !tag.is_empty() && !lean_dec {
            return Err(Error::Config {
                model: name.into(),
                msg: format!("tag `{tag}`: only lean models take tags"),
            });
        }
        let b = describe(&bb)?;
        let small = b.input_size[1] == 32;
        return Ok(ModelInfo {
            name: name.to_string(),
            family: b.family,
            input_size: if small { [3, 64, 64] } else { [3, 512, 512] },
            mean: b.mean,
            std: b.std,
            num_classes: if small { 11 } else { 21 },
            segmentation: true,
        });
    }
    let (a, lean, small) = parse_arch(arch).ok_or_else(|| unknown(arch))?;
    if !tag.is_empty() {
        let mut k = Conv3x3Kind::lean();
        if !lean {
            k = Conv3x3Kind::Dense;
        }
        apply_tag(name, tag, &mut k)?;
    }
    let family = match a {
        Arch::ResNet(_) if lean => Family::LeanResNet,
        Arch::ResNet(_) => Family::ResNet,
        Arch::MobileNetV2(_) => Family::MobileNetV2,
        Arch::ShuffleNetV2(_) => Family::ShuffleNetV2,
    };
    let num_classes = match &a {
        Arch::ResNet(c) => c.num_classes,
        Arch::MobileNetV2(c) => c.num_classes,
        Arch::ShuffleNetV2(c) => c.num_classes,
    };
    let (input_size, mean, std) = if small {
        ([3, 32, 32], CIFAR_MEAN, CIFAR_STD)
    } else {
        ([3, 224, 224], IMAGENET_MEAN, IMAGENET_STD)
    };
    Ok(ModelInfo {
        name: name.to_string(),
        family,
        input_size,
        mean,
        std,
        num_classes,
        segmentation: false,
    })
}

/// A layer's configuration error, named within the model (`model: layer: what`).
fn in_model(name: &str, e: Error) -> Error {
    match e {
        Error::Config { model, msg } if model != name => Error::Config {
            model: name.to_string(),
            msg: format!("{model}: {msg}"),
        },
        e => e,
    }
}

/// Builds `name` (`arch` or `arch.tag`) with `opts`, loading or creating its weights in `vb`.
pub fn create_model(name: &str, opts: &ModelOptions, vb: VarBuilder) -> Result<Box<dyn Model>> {
    let (arch, tag) = name.split_once('.').unwrap_or((name, ""));
    if let Some((head, lean_dec, bb)) = parse_seg(arch) {
        let info = describe(name)?;
        let small = info.input_size[1] == 64;
        let bb_lean = bb.starts_with("lean_");
        opts.check(name)?;
        let bad = |msg: String| Error::Config {
            model: name.to_string(),
            msg,
        };
        for (option, set) in [
            ("features_only", opts.features_only),
            ("dilate_last", opts.dilate_last.is_some()),
            ("dense_downsample", opts.dense_downsample.is_some() && !bb_lean),
        ] {
            if set {
                return Err(bad(format!("option {option} is not supported by this model")));
            }
        }
        let knobs = opts.lean_knobs_set();
        if !knobs.is_empty() && !lean_dec {
            return Err(bad(format!("option {} applies to lean models only", knobs.join(", "))));
        }
        let mut bopts = ModelOptions {
            features_only: true,
            num_classes: None,
            width: opts.width,
            in_channels: opts.in_channels,
            ..Default::default()
        };
        if bb_lean {
            (bopts.stencil, bopts.group_size, bopts.dense_downsample, bopts.lean_init) =
                (opts.stencil, opts.group_size, opts.dense_downsample, opts.lean_init);
        }
        // DeepLabV3 keeps the ImageNet-stem ResNets at output stride 8 with dilation.
        if head == crate::segment::SegHead::Aspp && !small && bb.contains("resnet") {
            bopts.dilate_last = Some(2);
        }
        let bb_name = if bb_lean && !tag.is_empty() {
            format!("{bb}.{tag}")
        } else {
            bb.clone()
        };
        let backbone = create_model(&bb_name, &bopts, vb.pp("backbone")).map_err(|e| in_model(name, e))?;
        let mut conv = if lean_dec {
            Conv3x3Kind::lean()
        } else {
            Conv3x3Kind::Dense
        };
        if !tag.is_empty() {
            apply_tag(name, tag, &mut conv)?;
        }
        if let Conv3x3Kind::Lean {
            stencil,
            group_size,
            init,
            ..
        } = &mut conv
        {
            *stencil = opts.stencil.unwrap_or(*stencil);
            *group_size = opts.group_size.unwrap_or(*group_size);
            *init = opts.lean_init.unwrap_or(*init);
        }
        let cfg = crate::segment::SegDecoderConfig {
            head,
            channels: if small { 32 } else { 256 },
            conv,
            rates: if small { [2, 4, 6] } else { [6, 12, 18] },
            num_classes: opts.num_classes.unwrap_or(info.num_classes),
        };
        return Ok(Box::new(
            crate::segment::SegmentationModel::new(backbone, &cfg, vb).map_err(|e| in_model(name, e))?,
        ));
    }
    let (a, lean, _) = parse_arch(arch).ok_or_else(|| unknown(arch))?;
    let bad = |msg: String| Error::Config {
        model: name.to_string(),
        msg,
    };
    opts.check(name)?;
    let knobs = opts.lean_knobs_set();
    if !knobs.is_empty() && !lean {
        return Err(bad(format!("option {} applies to lean models only", knobs.join(", "))));
    }
    let unsupported = |option: &str| bad(format!("option {option} is not supported by this model"));
    Ok(match a {
        Arch::ResNet(mut c) => {
            if opts.width.is_some() {
                return Err(unsupported("width (ResNets have no width multiplier)"));
            }
            if !tag.is_empty() {
                apply_tag(name, tag, &mut c.conv)?;
            }
            if let Conv3x3Kind::Lean {
                stencil,
                group_size,
                dense_downsample,
                init,
            } = &mut c.conv
            {
                *stencil = opts.stencil.unwrap_or(*stencil);
                *group_size = opts.group_size.unwrap_or(*group_size);
                *dense_downsample = opts.dense_downsample.unwrap_or(*dense_downsample);
                *init = opts.lean_init.unwrap_or(*init);
            }
            c.in_channels = opts.in_channels.unwrap_or(c.in_channels);
            c.num_classes = opts.num_classes.unwrap_or(c.num_classes);
            c.features_only = opts.features_only;
            c.dilate_last = opts.dilate_last.unwrap_or(0);
            if c.dilate_last > 2 || c.dilate_last >= c.layers.len() {
                return Err(bad(format!("dilate_last must be 0, 1 or 2, got {}", c.dilate_last)));
            }
            Box::new(ResNet::new(&c, vb).map_err(|e| in_model(name, e))?)
        }
        Arch::MobileNetV2(mut c) => {
            if !tag.is_empty() {
                return Err(bad(format!("tag `{tag}`: only lean models take tags")));
            }
            if opts.dilate_last.is_some() {
                return Err(unsupported("dilate_last"));
            }
            c.width = opts.width.unwrap_or(c.width);
            c.in_channels = opts.in_channels.unwrap_or(c.in_channels);
            c.num_classes = opts.num_classes.unwrap_or(c.num_classes);
            c.features_only = opts.features_only;
            Box::new(MobileNetV2::new(&c, vb).map_err(|e| in_model(name, e))?)
        }
        Arch::ShuffleNetV2(mut c) => {
            if !tag.is_empty() {
                return Err(bad(format!("tag `{tag}`: only lean models take tags")));
            }
            if opts.dilate_last.is_some() {
                return Err(unsupported("dilate_last"));
            }
            if opts.features_only {
                return Err(unsupported("features_only"));
            }
            if let Some(w) = opts.width {
                let small = c.small_stem;
                c = ShuffleNetV2Config::width(w)
                    .ok_or_else(|| bad(format!("width must be 0.5, 1.0, 1.5 or 2.0, got {w}")))?;
                c.small_stem = small;
                c.num_classes = if small { 10 } else { 1000 };
            }
            c.in_channels = opts.in_channels.unwrap_or(c.in_channels);
            c.num_classes = opts.num_classes.unwrap_or(c.num_classes);
            Box::new(ShuffleNetV2::new(&c, vb).map_err(|e| in_model(name, e))?)
        }
    })
}
