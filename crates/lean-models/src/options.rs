//! The one options type for building a model: [`ModelOptions`] (what the registry takes, what
//! the CLI's flags parse into with the `clap` feature, what checkpoints and exported configs
//! store), and [`ModelSpec`], a registry name with its options.

use crate::{create_model, Error, Model, Result};
use lean_ops::{LeanInit, Stencil};
use serde::{Deserialize, Serialize};

/// Options that override a model's defaults; `None` keeps the default.
///
/// Serialised with the knobs as strings (`"stencil": "four"`), so `config.json` files stay
/// readable; an option a model does not support is an error naming both.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct ModelOptions {
    /// Number of classes (default: the model's, 1000 ImageNet / 10 small-image; a data set's
    /// when training).
    #[cfg_attr(feature = "clap", arg(long))]
    pub num_classes: Option<usize>,
    /// Input channels (1 for grey images).
    #[cfg_attr(feature = "clap", arg(long))]
    pub in_channels: Option<usize>,
    /// Width multiplier (MobileNetV2 any, ShuffleNetV2 0.5/1.0/1.5/2.0).
    #[cfg_attr(feature = "clap", arg(long))]
    pub width: Option<f64>,
    /// Lean models: stencil of the grouped branch (five, four, h3, v3, full).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, with = "by_name")]
    pub stencil: Option<Stencil>,
    /// Lean models: input channels per group (1 = depthwise).
    #[cfg_attr(feature = "clap", arg(long))]
    pub group_size: Option<usize>,
    /// Lean models: keep the strided 3x3 convolutions dense.
    #[cfg_attr(feature = "clap", arg(long, num_args = 0..=1, default_missing_value = "true"))]
    pub dense_downsample: Option<bool>,
    /// Lean models: initialisation of new weights (balanced, fanout).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, with = "by_name", skip_serializing_if = "Option::is_none")]
    pub lean_init: Option<LeanInit>,
    /// ResNets: how many of the last stages are dilated instead of strided (0-2).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dilate_last: Option<usize>,
    /// Build the feature extractor only (a backbone: no classifier).
    #[cfg_attr(feature = "clap", arg(skip))]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub features_only: bool,
}

impl ModelOptions {
    /// Refuses values no model accepts (zero classes, channels or group size).
    pub(crate) fn check(&self, model: &str) -> Result<()> {
        for (name, v) in [
            ("num_classes", self.num_classes),
            ("in_channels", self.in_channels),
            ("group_size", self.group_size),
        ] {
            if v == Some(0) {
                return Err(Error::Config {
                    model: model.into(),
                    msg: format!("{name} must be at least 1, got 0"),
                });
            }
        }
        if let Some(w) = self.width {
            if !(w.is_finite() && w > 0.0) {
                return Err(Error::Config {
                    model: model.into(),
                    msg: format!("width must be a positive number, got {w}"),
                });
            }
        }
        Ok(())
    }
}

/// A model by registry name (`arch` or `arch.tag`) and options: the serialisable recipe of a
/// model, as stored in checkpoints and `config.json` (the options flattened beside the name).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Registry name (`lean models` lists them).
    pub name: String,
    /// Options over the model's defaults.
    #[serde(flatten)]
    pub options: ModelOptions,
}

impl ModelSpec {
    /// A spec with default options.
    pub fn new(name: impl Into<String>) -> Self {
        ModelSpec {
            name: name.into(),
            options: ModelOptions::default(),
        }
    }

    /// Builds the model, loading or creating its weights in `vb`.
    pub fn build(&self, vb: candle_nn::VarBuilder) -> Result<Box<dyn Model>> {
        create_model(&self.name, &self.options, vb)
    }
}

/// Serde for `Option<T>` through `T`'s name (`Display` / `FromStr`).
mod by_name {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::fmt::Display;
    use std::str::FromStr;

    pub fn serialize<T: Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        match Option::<String>::deserialize(d)? {
            Some(s) => s.parse().map(Some).map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}
