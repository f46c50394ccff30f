//! Models on disk and on the Hugging Face Hub: a folder with `model.safetensors` (torchvision
//! names), `config.json` ([`PretrainedConfig`]: architecture, knobs, normalisation, labels,
//! metrics) and a model card `README.md`.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/lean_resnet18_cifar");
//! // `dir` is a folder made by `lean export`, e.g. models/lean_resnet18_cifar; with the `hub`
//! // feature "hf-hub:ORG/REPO" works too.
//! let (model, cfg) = lean_models::pretrained::load(dir, &Device::Cpu)?;
//! let [c, h, w] = cfg.data.input_size;
//! let image = Tensor::zeros((1, c, h, w), candle_core::DType::F32, &Device::Cpu)?;
//! let logits = model.forward_t(&cfg.normalize(&image)?, false)?;
//! assert_eq!(logits.dims(), &[1, cfg.data.label_names.len()]);
//! # Ok(()) }
//! ```

use crate::{Error, Model, ModelSpec, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The `format` marker of [`PretrainedConfig`].
pub const FORMAT: &str = "lean-convnets/1";

/// What a model was trained to see: its input size, normalisation, class names and data set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataSpec {
    /// Input size (C, H, W) the model was trained and evaluated at.
    pub input_size: [usize; 3],
    /// Normalisation mean per channel.
    pub mean: Vec<f32>,
    /// Normalisation std per channel.
    pub std: Vec<f32>,
    /// Class names, by class index.
    pub label_names: Vec<String>,
    /// The data set's name.
    pub dataset: String,
}

/// The `config.json` of an exported model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PretrainedConfig {
    /// Format marker ([`FORMAT`]).
    pub format: String,
    /// The model: registry name and options (classes and input channels included).
    pub model: ModelSpec,
    /// Input size, normalisation, class names and the data set it was evaluated on.
    #[serde(flatten)]
    pub data: DataSpec,
    /// The evaluation it was published with.
    pub metrics: PublishedMetrics,
    /// Parameters.
    pub params: u64,
    /// MACs per image at the input size.
    pub macs: u64,
    /// The training recipe (the training configuration, as the trainer wrote it).
    pub recipe: serde_json::Value,
}

/// The evaluation a model was published with: top-1/top-5 for classifiers, mIoU, pixel
/// accuracy and per-class IoU for segmentation models (percent).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PublishedMetrics {
    /// Split evaluated (`test`).
    pub split: String,
    /// Samples evaluated.
    pub samples: usize,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Top-1 accuracy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1: Option<f64>,
    /// Top-5 accuracy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top5: Option<f64>,
    /// Mean IoU over the classes present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub miou: Option<f64>,
    /// Pixel accuracy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_acc: Option<f64>,
    /// IoU of each class (None: absent from truth and prediction).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iou: Option<Vec<Option<f64>>>,
}

impl DataSpec {
    /// Normalises a batch of images (N, C, H, W) in [0, 1] with the model's mean and std.
    pub fn normalize(&self, images: &Tensor) -> Result<Tensor> {
        let c = self.mean.len();
        if images.rank() != 4 || images.dim(1)? != c || self.std.len() != c {
            return Err(Error::Config {
                model: self.dataset.clone(),
                msg: format!("normalize expects (N, {c}, H, W) images, got shape {:?}", images.dims()),
            });
        }
        let dev = images.device();
        let mean = Tensor::from_slice(&self.mean, (1, c, 1, 1), dev)?.to_dtype(images.dtype())?;
        let std = Tensor::from_slice(&self.std, (1, c, 1, 1), dev)?.to_dtype(images.dtype())?;
        Ok(images.broadcast_sub(&mean)?.broadcast_div(&std)?)
    }
}

impl PretrainedConfig {
    /// Normalises a batch of images as the model expects ([`DataSpec::normalize`]).
    pub fn normalize(&self, images: &Tensor) -> Result<Tensor> {
        self.data.normalize(images)
    }

    /// The headline score: mIoU for segmentation models, else top-1.
    pub fn score(&self) -> Option<f64> {
        self.metrics.miou.or(self.metrics.top1)
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// Reads the `config.json` of an exported folder.
pub fn read_config(dir: &Path) -> Result<PretrainedConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
    let cfg: PretrainedConfig = serde_json::from_str(&text).map_err(|e| Error::Io {
        path: path.clone(),
        msg: format!("not an exported lean-convnets model config: {e}"),
    })?;
    if cfg.format != FORMAT {
        return Err(io_err(
            &path,
            format!("format `{}` is not the supported `{FORMAT}`", cfg.format),
        ));
    }
    Ok(cfg)
}

/// Reads a safetensors weights file into a VarBuilder (f32). The file is read, not
/// memory-mapped: the models are small, and no `unsafe` is needed.
pub fn load_weights(path: &Path, device: &Device) -> Result<VarBuilder<'static>> {
    let tensors = candle_core::safetensors::load(path, device).map_err(|e| io_err(path, e))?;
    Ok(VarBuilder::from_tensors(tensors, DType::F32, device))
}

/// Loads an exported folder: its model (on `device`) and config.
pub fn load_dir(dir: &Path, device: &Device) -> Result<(Box<dyn Model>, PretrainedConfig)> {
    let cfg = read_config(dir)?;
    let weights = dir.join("model.safetensors");
    if !weights.is_file() {
        return Err(io_err(&weights, "missing (an exported folder holds model.safetensors)"));
    }
    let vb = load_weights(&weights, device)?;
    let model = cfg.model.build(vb).map_err(|e| Error::Config {
        model: cfg.model.name.clone(),
        msg: format!("{} does not fit the model of its config.json: {e}", weights.display()),
    })?;
    Ok((model, cfg))
}

/// Loads a published model: a folder made by [`export`], or `hf-hub:ORG/REPO` (feature `hub`).
pub fn load(source: impl AsRef<str>, device: &Device) -> Result<(Box<dyn Model>, PretrainedConfig)> {
    let source = source.as_ref();
    let dir = match source.strip_prefix("hf-hub:") {
        Some(repo) => fetch(repo)?,
        None => PathBuf::from(source),
    };
    load_dir(&dir, device)
}

fn parse_repo(repo: &str) -> Result<&str> {
    if repo.split('/').count() != 2 || repo.split('/').any(str::is_empty) {
        return Err(Error::Hub {
            repo: repo.into(),
            msg: "expected hf-hub:ORG/REPO".into(),
        });
    }
    Ok(repo)
}

/// Resolves a Hub repository `ORG/REPO` to a local folder holding its config.json and
/// model.safetensors, through the hf-hub cache (`HF_HOME`, `HF_ENDPOINT`; `HF_HUB_OFFLINE=1`
/// uses the cache only).
#[cfg(feature = "hub")]
pub fn fetch(repo: &str) -> Result<PathBuf> {
    let repo = parse_repo(repo)?;
    let hub_err = |msg: String| Error::Hub { repo: repo.into(), msg };
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let mut dir = None;
    for file in ["config.json", "model.safetensors"] {
        let path = if offline {
            hf_hub::Cache::from_env()
                .model(repo.to_string())
                .get(file)
                .ok_or_else(|| {
                    hub_err(format!(
                        "{file} is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
                    ))
                })?
        } else {
            let api = hf_hub::api::sync::ApiBuilder::from_env()
                .with_progress(false)
                .build()
                .map_err(|e| hub_err(e.to_string()))?;
            api.model(repo.to_string())
                .get(file)
                .map_err(|e| hub_err(format!("cannot fetch {file}: {e}")))?
        };
        dir = path.parent().map(Path::to_path_buf);
    }
    dir.ok_or_else(|| hub_err("no files".into()))
}

/// Without the `hub` feature there is no Hub client: an error saying so.
#[cfg(not(feature = "hub"))]
pub fn fetch(repo: &str) -> Result<PathBuf> {
    let repo = parse_repo(repo)?;
    Err(Error::Hub {
        repo: repo.into(),
        msg: "lean-models was built without its `hub` feature".into(),
    })
}

/// The model card (`README.md`) of an exported folder; `recipe` is a sentence describing the
/// training (or empty).
pub fn model_card(c: &PretrainedConfig, recipe: &str, folder: &str) -> String {
    let m = &c.metrics;
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}%"));
    let scores = if m.miou.is_some() {
        format!(
            "| test mIoU | {} |\n| test pixel accuracy | {} |\n",
            pct(m.miou),
            pct(m.pixel_acc)
        )
    } else {
        format!("| test top-1 | {} |\n| test top-5 | {} |\n", pct(m.top1), pct(m.top5))
    };
    let [ch, h, w] = c.data.input_size;
    let recipe = if recipe.is_empty() {
        String::new()
    } else {
        format!("## Recipe\n\n{recipe}\n\n")
    };
    format!(
        "# {name} on {ds}\n\n\
         A `{name}` from [lean-convnets](https://github.com/lean-convnets/lean-convnets) trained on {ds}.\n\n\
         | | |\n|---|---|\n| parameters | {params} |\n| MACs per image | {macs} at {ch}x{h}x{w} |\n{scores}| test samples | {n} |\n\n\
         {recipe}\
         ## Use\n\n```sh\nlean eval --weights {folder}\n```\n\n\
         or in Rust: `lean_models::pretrained::load(\"{folder}\", &Device::Cpu)` returns the model and this \
         folder's config; normalise inputs with mean {mean:?}, std {std:?} (`PretrainedConfig::normalize`).\n",
        name = c.model.name,
        ds = c.data.dataset,
        params = c.params,
        macs = c.macs,
        n = m.samples,
        mean = c.data.mean,
        std = c.data.std,
    )
}

/// Writes an exported folder — `model.safetensors`, `config.json` and the model card — as a
/// whole: into `<dir>.partial` first, then renamed over `dir`, so a failed export never leaves
/// a half-written or mixed folder.
pub fn export(dir: &Path, config: &PretrainedConfig, tensors: &HashMap<String, Tensor>, recipe: &str) -> Result<()> {
    let tmp = dir.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    let weights = tmp.join("model.safetensors");
    candle_core::safetensors::save(tensors, &weights).map_err(|e| io_err(&weights, e))?;
    let json = serde_json::to_vec_pretty(config).map_err(|e| io_err(dir, e))?;
    write_file(&tmp.join("config.json"), &json)?;
    let card = model_card(config, recipe, &dir.display().to_string());
    write_file(&tmp.join("README.md"), card.as_bytes())?;
    if dir.exists() {
        let old = dir.with_extension("old");
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| io_err(&old, e))?;
        }
        std::fs::rename(dir, &old).map_err(|e| io_err(dir, e))?;
        std::fs::rename(&tmp, dir).map_err(|e| io_err(dir, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| io_err(&old, e))?;
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| io_err(dir, e))?;
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::fs::write_atomic(path, bytes)
}
