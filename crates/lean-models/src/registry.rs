//! The model registry: a table of [`ModelEntry`]s, one per architecture name, each declared
//! beside its model (`registry_entries` in resnet.rs, mobilenet_v2.rs, shufflenet_v2.rs and
//! segment.rs). [`list_models`], [`describe`] and [`create_model`] read the table; an option a
//! model does not support is an error naming both.
//!
//! Tags (lean models only) are timm-style `arch.tag` presets of the lean knobs: `_`-separated
//! tokens, a stencil (`five`, `four`, `h3`, `v3`, `full`), a group size `g<N>`, `dd` for dense
//! downsampling, and an initialisation of new lean weights (`balanced`, the default, or
//! `fanout`), e.g. `lean_resnet18.four_g2`.

use crate::layers::Conv3x3Kind;
use crate::model::Model;
use crate::{Error, ModelOptions, Result};
use candle_nn::VarBuilder;
use lean_ops::{LeanInit, Stencil};
use std::sync::LazyLock;

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

/// One field of [`ModelOptions`], to say which a model supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelOption {
    /// `num_classes`.
    NumClasses,
    /// `in_channels`.
    InChannels,
    /// `width`.
    Width,
    /// `stencil` (lean).
    Stencil,
    /// `group_size` (lean).
    GroupSize,
    /// `dense_downsample` (lean).
    DenseDownsample,
    /// `lean_init` (lean).
    LeanInit,
    /// `dilate_last`.
    DilateLast,
    /// `features_only`.
    FeaturesOnly,
}

impl ModelOption {
    /// Every option.
    pub const ALL: [ModelOption; 9] = [
        ModelOption::NumClasses,
        ModelOption::InChannels,
        ModelOption::Width,
        ModelOption::Stencil,
        ModelOption::GroupSize,
        ModelOption::DenseDownsample,
        ModelOption::LeanInit,
        ModelOption::DilateLast,
        ModelOption::FeaturesOnly,
    ];

    /// The lean knobs.
    pub const LEAN: [ModelOption; 4] = [
        ModelOption::Stencil,
        ModelOption::GroupSize,
        ModelOption::DenseDownsample,
        ModelOption::LeanInit,
    ];

    /// The field's name.
    pub fn name(self) -> &'static str {
        match self {
            ModelOption::NumClasses => "num_classes",
            ModelOption::InChannels => "in_channels",
            ModelOption::Width => "width",
            ModelOption::Stencil => "stencil",
            ModelOption::GroupSize => "group_size",
            ModelOption::DenseDownsample => "dense_downsample",
            ModelOption::LeanInit => "lean_init",
            ModelOption::DilateLast => "dilate_last",
            ModelOption::FeaturesOnly => "features_only",
        }
    }

    /// Whether `o` sets it.
    pub fn is_set(self, o: &ModelOptions) -> bool {
        match self {
            ModelOption::NumClasses => o.num_classes.is_some(),
            ModelOption::InChannels => o.in_channels.is_some(),
            ModelOption::Width => o.width.is_some(),
            ModelOption::Stencil => o.stencil.is_some(),
            ModelOption::GroupSize => o.group_size.is_some(),
            ModelOption::DenseDownsample => o.dense_downsample.is_some(),
            ModelOption::LeanInit => o.lean_init.is_some(),
            ModelOption::DilateLast => o.dilate_last.is_some(),
            ModelOption::FeaturesOnly => o.features_only,
        }
    }
}

/// A default input: size and normalisation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InputSpec {
    /// (C, H, W).
    pub size: [usize; 3],
    /// Mean per channel.
    pub mean: [f32; 3],
    /// Std per channel.
    pub std: [f32; 3],
}

impl InputSpec {
    /// ImageNet: 3x224x224, ImageNet statistics.
    pub const IMAGENET: InputSpec = InputSpec {
        size: [3, 224, 224],
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
    /// Small images: 3x32x32, CIFAR-10 statistics.
    pub const SMALL: InputSpec = InputSpec {
        size: [3, 32, 32],
        mean: [0.4914, 0.4822, 0.4465],
        std: [0.2470, 0.2435, 0.2616],
    };

    /// The same statistics at another size.
    pub const fn at(self, h: usize, w: usize) -> InputSpec {
        InputSpec {
            size: [self.size[0], h, w],
            ..self
        }
    }
}

/// What a builder receives: the full name, the options, and the 3x3 kind the registry resolved
/// from the entry's default knobs, the tag and the options.
pub struct BuildArgs<'a> {
    /// The name asked for (`arch` or `arch.tag`).
    pub name: &'a str,
    /// The tag (empty if none).
    pub tag: &'a str,
    /// The options (already checked against the entry's supported ones).
    pub options: &'a ModelOptions,
    /// Dense, or lean with its knobs.
    pub conv: Conv3x3Kind,
    /// Where the weights are loaded from or created.
    pub vb: VarBuilder<'a>,
}

/// Builds a model from [`BuildArgs`].
pub type Builder = Box<dyn Fn(BuildArgs) -> Result<Box<dyn Model>> + Send + Sync>;

/// One registered architecture.
pub struct ModelEntry {
    /// The architecture name (without tag).
    pub name: String,
    /// The family.
    pub family: Family,
    /// Default input and normalisation.
    pub input: InputSpec,
    /// Default number of classes.
    pub num_classes: usize,
    /// Per-pixel logits.
    pub segmentation: bool,
    /// Its default 3x3 convolutions: lean (then it takes tags and the lean knobs) or dense.
    pub default_conv: Conv3x3Kind,
    /// The options it supports.
    pub supports: Vec<ModelOption>,
    /// The builder.
    pub build: Builder,
}

impl ModelEntry {
    /// Whether it is a lean model (takes tags and the lean knobs).
    pub fn is_lean(&self) -> bool {
        matches!(self.default_conv, Conv3x3Kind::Lean { .. })
    }

    fn info(&self, name: &str) -> ModelInfo {
        ModelInfo {
            name: name.to_string(),
            family: self.family,
            input_size: self.input.size,
            mean: self.input.mean,
            std: self.input.std,
            num_classes: self.num_classes,
            segmentation: self.segmentation,
        }
    }

    /// The 3x3 kind for a tag and options, or an error naming the model.
    fn conv(&self, name: &str, tag: &str, opts: &ModelOptions) -> Result<Conv3x3Kind> {
        let mut kind = self.default_conv;
        if !tag.is_empty() {
            apply_tag(name, tag, &mut kind)?;
        }
        if let Conv3x3Kind::Lean {
            stencil,
            group_size,
            dense_downsample,
            init,
        } = &mut kind
        {
            *stencil = opts.stencil.unwrap_or(*stencil);
            *group_size = opts.group_size.unwrap_or(*group_size);
            *dense_downsample = opts.dense_downsample.unwrap_or(*dense_downsample);
            *init = opts.lean_init.unwrap_or(*init);
        }
        Ok(kind)
    }

    /// Refuses options the entry does not support, naming them.
    fn check(&self, name: &str, opts: &ModelOptions) -> Result<()> {
        opts.check(name)?;
        let bad = |msg: String| {
            Err(Error::Config {
                model: name.to_string(),
                msg,
            })
        };
        let lean_set: Vec<&str> = ModelOption::LEAN
            .iter()
            .filter(|o| o.is_set(opts))
            .map(|o| o.name())
            .collect();
        if !self.is_lean() && !lean_set.is_empty() {
            return bad(format!("option {} applies to lean models only", lean_set.join(", ")));
        }
        match ModelOption::ALL
            .into_iter()
            .find(|o| o.is_set(opts) && !self.supports.contains(o))
        {
            Some(o) => bad(format!("option {} is not supported by this model", o.name())),
            None => Ok(()),
        }
    }
}

/// Options every classifier supports.
pub(crate) const BASE_OPTIONS: [ModelOption; 2] = [ModelOption::NumClasses, ModelOption::InChannels];

static REGISTRY: LazyLock<Vec<ModelEntry>> = LazyLock::new(|| {
    let mut v = crate::resnet::registry_entries();
    v.extend(crate::mobilenet_v2::registry_entries());
    v.extend(crate::shufflenet_v2::registry_entries());
    v.extend(crate::segment::registry_entries());
    v
});

/// Every registered architecture, in listing order.
pub fn entries() -> &'static [ModelEntry] {
    &REGISTRY
}

/// Every registered architecture name (without tags).
pub fn model_names() -> Vec<String> {
    entries().iter().map(|e| e.name.clone()).collect()
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
    entries()
        .iter()
        .filter(|e| pattern.is_none_or(|p| glob(p, &e.name) || (!p.contains(['*', '?']) && e.name.contains(p))))
        .map(|e| e.info(&e.name))
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

/// The entry of `name` (`arch` or `arch.tag`) and its tag; unknown names get suggestions.
fn lookup(name: &str) -> Result<(&'static ModelEntry, &str)> {
    let (arch, tag) = name.split_once('.').unwrap_or((name, ""));
    if let Some(e) = entries().iter().find(|e| e.name == arch) {
        return Ok((e, tag));
    }
    let mut scored: Vec<(usize, &str)> = entries()
        .iter()
        .map(|e| (edit_distance(arch, &e.name), e.name.as_str()))
        .collect();
    scored.sort();
    Err(Error::UnknownModel {
        name: arch.to_string(),
        suggestions: scored
            .into_iter()
            .filter(|(d, _)| *d <= 4)
            .take(3)
            .map(|(_, n)| n.to_string())
            .collect(),
    })
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
    let (e, tag) = lookup(name)?;
    e.conv(name, tag, &ModelOptions::default())?;
    Ok(e.info(name))
}

/// A layer's configuration error, named within the model (`model: layer: what`).
pub(crate) fn in_model(name: &str, e: Error) -> Error {
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
    let (e, tag) = lookup(name)?;
    e.check(name, opts)?;
    let conv = e.conv(name, tag, opts)?;
    let args = BuildArgs {
        name,
        tag,
        options: opts,
        conv,
        vb,
    };
    (e.build)(args).map_err(|err| in_model(name, err))
}
