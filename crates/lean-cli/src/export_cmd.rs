//! `lean export`: a hub-ready folder (weights, config.json, model card), and loading such
//! folders back, locally or from the Hugging Face Hub.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use clap::Args;
use lean_data::{dataset_info, LoaderConfig, Split};
use lean_models::{create_model, describe, Model};
use lean_train::{
    checkpoint::load_checkpoint, checkpoint_model, checkpoint_path, eval_pipeline, evaluate, open_limited,
    write_atomic, ModelSpec, RunState,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The `config.json` of an exported model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExportConfig {
    /// Format marker.
    pub format: String,
    /// The model: registry name, knobs, classes and input channels.
    pub model: ModelSpec,
    /// Input size (C, H, W) the model was trained and evaluated at.
    pub input_size: [usize; 3],
    /// Normalisation mean.
    pub mean: Vec<f32>,
    /// Normalisation std.
    pub std: Vec<f32>,
    /// Class names.
    pub label_names: Vec<String>,
    /// The data set it was evaluated on.
    pub dataset: String,
    /// The evaluation it was published with.
    pub metrics: serde_json::Value,
    /// Parameters.
    pub params: u64,
    /// MACs per image at `input_size`.
    pub macs: u64,
    /// The training recipe.
    pub recipe: serde_json::Value,
}

/// Arguments of `lean export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A run folder (its best checkpoint) or a checkpoint file.
    run: PathBuf,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Export the last instead of the best checkpoint of a run folder.
    #[arg(long)]
    last: bool,
    /// Evaluate on the first N test samples only (default: the whole test split; the count is
    /// recorded with the metrics).
    #[arg(long)]
    limit_val: Option<usize>,
}

fn card(c: &ExportConfig, cmd: &str) -> String {
    let m = &c.metrics;
    let r = &c.recipe;
    format!(
        "# {name} on {ds}\n\n\
         A `{name}` from [lean-convnets](https://github.com/lean-convnets/lean-convnets) trained on {ds}.\n\n\
         | | |\n|---|---|\n| parameters | {params} |\n| MACs per image | {macs} at {c}x{h}x{w} |\n{scores}| test samples | {n} |\n\n\
         ## Recipe\n\n{epochs} epochs of {train} training images, batch {bs}, {opt} lr {lr} ({sched}, {warm} warmup epochs), weight decay {wd}, label smoothing {sm}, seed {seed}, random crop + flip: {aug}.\n\n\
         ## Use\n\n```sh\nlean eval --weights {cmd}\n```\n\nor in Rust: build `{name}` with `lean_models::create_model` (options in config.json) on a `VarBuilder` of `model.safetensors`; normalise inputs with mean {mean:?}, std {std:?}.\n",
        name = c.model.name,
        ds = c.dataset,
        params = c.params,
        macs = c.macs,
        c = c.input_size[0],
        h = c.input_size[1],
        w = c.input_size[2],
        scores = match m.get("miou").and_then(|v| v.as_f64()) {
            Some(miou) => format!("| test mIoU | {miou:.2}% |\n| test pixel accuracy | {:.2}% |\n", m["pixel_acc"].as_f64().unwrap_or(0.0)),
            None => format!(
                "| test top-1 | {:.2}% |\n| test top-5 | {:.2}% |\n",
                m["top1"].as_f64().unwrap_or(0.0),
                m["top5"].as_f64().unwrap_or(0.0)
            ),
        },
        n = m["samples"],
        epochs = r["epochs"],
        train = match r["limit_train"].as_u64() {
            Some(n) => format!("the first {n}"),
            None => "all the".to_string(),
        },
        bs = r["batch_size"],
        opt = r["opt"].as_str().unwrap_or(""),
        lr = r["lr"],
        sched = r["sched"].as_str().unwrap_or(""),
        warm = r["warmup_epochs"],
        wd = r["weight_decay"],
        sm = r["smoothing"],
        seed = r["seed"],
        aug = r["augment"],
        mean = c.mean,
        std = c.std,
    )
}

/// Entry point of `lean export`.
pub fn run(a: &ExportArgs) -> Result<()> {
    let ck = if a.run.is_dir() && !a.last && a.run.join("best.safetensors").is_file() {
        a.run.join("best.safetensors")
    } else {
        checkpoint_path(&a.run)
    };
    let device = Device::Cpu;
    let ck_data =
        load_checkpoint::<RunState>(&ck).with_context(|| format!("cannot load checkpoint {}", ck.display()))?;
    let model = checkpoint_model(&ck_data, &device)
        .with_context(|| format!("cannot build the model of checkpoint {}", ck.display()))?;
    let tensors = &ck_data.model;
    let cfg = &ck_data.meta.config;
    let ds = open_limited(&cfg.dataset, &cfg.data_dir, Split::Test, a.limit_val)?;
    let pipe = eval_pipeline(&cfg.dataset, ds.as_ref(), &cfg.model.name)?;
    let loader = lean_data::Loader::new(
        ds.clone(),
        pipe,
        LoaderConfig {
            batch_size: 256,
            shuffle: false,
            ..Default::default()
        },
        device,
    )?;
    let ev = evaluate(model.as_ref(), &loader)?;
    let info = dataset_info(&cfg.dataset)?;
    let input_size = match ds.image_shape() {
        Some(s) => s,
        None => describe(&cfg.model.name)?.input_size,
    };
    let mut spec = cfg.model.clone();
    spec.num_classes = Some(model.num_classes());
    spec.in_channels = Some(input_size[0]);
    let cost = model.cost(&[1, input_size[0], input_size[1], input_size[2]])?;
    let config = ExportConfig {
        format: "lean-convnets/1".into(),
        model: spec,
        input_size,
        mean: info.mean,
        std: info.std,
        label_names: ds.classes().to_vec(),
        dataset: cfg.dataset.clone(),
        metrics: match (ev.miou, ev.pixel_acc) {
            (Some(miou), Some(pacc)) => {
                serde_json::json!({"miou": miou, "pixel_acc": pacc, "iou": ev.iou, "loss": ev.loss, "samples": ev.samples, "split": "test"})
            }
            _ => {
                serde_json::json!({"top1": ev.top1, "top5": ev.top5, "loss": ev.loss, "samples": ev.samples, "split": "test"})
            }
        },
        params: cost.params,
        macs: cost.macs,
        recipe: serde_json::to_value(cfg)?,
    };
    let tmp = a.out.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    candle_core::safetensors::save(tensors, tmp.join("model.safetensors"))?;
    write_atomic(&tmp.join("config.json"), &serde_json::to_vec_pretty(&config)?)?;
    write_atomic(
        &tmp.join("README.md"),
        card(&config, &a.out.display().to_string()).as_bytes(),
    )?;
    if a.out.exists() {
        let old = a.out.with_extension("old");
        std::fs::rename(&a.out, &old)?;
        std::fs::rename(&tmp, &a.out)?;
        std::fs::remove_dir_all(&old)?;
    } else {
        std::fs::rename(&tmp, &a.out)?;
    }
    match ev.miou {
        Some(miou) => println!(
            "exported {} (test mIoU {miou:.2}%) to {}",
            config.model.name,
            a.out.display()
        ),
        None => println!(
            "exported {} (test top-1 {:.2}%) to {}",
            config.model.name,
            ev.top1,
            a.out.display()
        ),
    }
    Ok(())
}

/// Reads a safetensors weights file into a VarBuilder (f32). The file is read, not memory-mapped:
/// the models are small, and no `unsafe` is needed.
pub fn load_weights(path: &Path, device: &Device) -> Result<VarBuilder<'static>> {
    let tensors = candle_core::safetensors::load(path, device)
        .with_context(|| format!("cannot load weights {}", path.display()))?;
    Ok(VarBuilder::from_tensors(tensors, DType::F32, device))
}

/// Loads an exported folder: its config and model.
pub fn load_exported(dir: &Path, device: &Device) -> Result<(ExportConfig, Box<dyn Model>)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?;
    let cfg: ExportConfig = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an exported lean model config", cfg_path.display()))?;
    let weights = dir.join("model.safetensors");
    if !weights.is_file() {
        bail!("{} is missing", weights.display());
    }
    let vb = load_weights(&weights, device)?;
    let model = create_model(&cfg.model.name, &cfg.model.options()?, vb)
        .with_context(|| format!("{} does not fit {}", weights.display(), cfg.model.name))?;
    Ok((cfg, model))
}

/// Resolves `hf-hub:ORG/REPO` to a local folder holding its config.json and model.safetensors,
/// through the hf-hub cache (`HF_HOME`, `HF_ENDPOINT`; `HF_HUB_OFFLINE=1` uses the cache only).
pub fn fetch_pretrained(spec: &str) -> Result<PathBuf> {
    let repo = spec
        .strip_prefix("hf-hub:")
        .with_context(|| format!("--pretrained `{spec}`: expected hf-hub:ORG/REPO"))?;
    if repo.split('/').count() != 2 || repo.split('/').any(str::is_empty) {
        bail!("--pretrained `{spec}`: expected hf-hub:ORG/REPO");
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let mut dir = None;
    for file in ["config.json", "model.safetensors"] {
        let path = if offline {
            hf_hub::Cache::from_env()
                .model(repo.to_string())
                .get(file)
                .with_context(|| {
                    format!("{file} of {repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
                })?
        } else {
            let api = hf_hub::api::sync::ApiBuilder::from_env().with_progress(false).build()?;
            api.model(repo.to_string())
                .get(file)
                .with_context(|| format!("cannot fetch {file} of {repo} from the Hugging Face Hub"))?
        };
        dir = path.parent().map(Path::to_path_buf);
    }
    dir.context("no files")
}
