//! `lean models`, `lean info`, `lean predict`.

use crate::model_args::parse_input_size;
use crate::output::{table, Format};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clap::Args;
use lean_data::transforms::{FImage, Pipeline, Transform};
use lean_models::{create_model, describe, list_models, pretrained, Model, ModelOptions};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Arguments of `lean models`.
#[derive(Args, Debug)]
pub struct ModelsArgs {
    /// Only names matching this pattern (`*` and `?` wildcards, or a substring).
    pattern: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(Serialize)]
struct ModelRow {
    name: String,
    family: &'static str,
    input_size: [usize; 3],
    num_classes: usize,
    params: u64,
    macs: u64,
}

fn build(name: &str, opts: &ModelOptions) -> Result<Box<dyn Model>> {
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    Ok(create_model(name, opts, vb)?)
}

/// Entry point of `lean models`.
pub fn models(args: &ModelsArgs) -> Result<()> {
    let infos = list_models(args.pattern.as_deref());
    if infos.is_empty() {
        bail!(
            "no model matches `{}` (`lean models` lists all)",
            args.pattern.as_deref().unwrap_or("")
        );
    }
    let mut rows = vec![];
    for info in infos {
        let model = build(&info.name, &ModelOptions::default())?;
        let [c, h, w] = info.input_size;
        let cost = model.cost(&[1, c, h, w])?;
        rows.push(ModelRow {
            name: info.name,
            family: info.family.as_str(),
            input_size: info.input_size,
            num_classes: info.num_classes,
            params: cost.params,
            macs: cost.macs,
        });
    }
    match args.format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&rows)?),
        Format::Table => {
            let body: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.name.clone(),
                        r.family.into(),
                        format!("{:?}", r.input_size),
                        format!("{:.3} M", r.params as f64 / 1e6),
                        format!("{:.3} G", r.macs as f64 / 1e9),
                    ]
                })
                .collect();
            outln!("{}", table(&["name", "family", "input", "params", "MACs"], &body));
            outln!("\nLean models take tags: NAME.TAG with TAG from a stencil (five|four|h3|v3|full), g<N>, dd, joined by `_`.");
        }
    }
    Ok(())
}

/// Arguments of `lean info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Model name (`lean models` lists them).
    model: String,
    /// Input size C,H,W (default: the model's).
    #[arg(long)]
    input_size: Option<String>,
    #[command(flatten)]
    opts: ModelOptions,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// Entry point of `lean info`.
pub fn info(args: &InfoArgs) -> Result<()> {
    let info = describe(&args.model)?;
    let mut opts = args.opts.clone();
    let [c, h, w] = match &args.input_size {
        Some(s) => {
            let [c, h, w] = parse_input_size(s)?;
            match opts.in_channels {
                Some(ic) if ic != c => bail!("--in-channels {ic} contradicts --input-size {s}"),
                _ => opts.in_channels = Some(c),
            }
            [c, h, w]
        }
        None => [
            opts.in_channels.unwrap_or(info.input_size[0]),
            info.input_size[1],
            info.input_size[2],
        ],
    };
    let model = build(&args.model, &opts)?;
    let rows = model.layers(&[1, c, h, w])?;
    let total: lean_ops::Cost = rows.iter().map(|r| r.cost).sum();
    match args.format {
        Format::Json => {
            #[derive(Serialize)]
            struct Row<'a> {
                name: &'a str,
                kind: &'a str,
                output_shape: &'a [usize],
                params: u64,
                macs: u64,
            }
            let layers: Vec<Row> = rows
                .iter()
                .map(|r| Row {
                    name: &r.name,
                    kind: &r.kind,
                    output_shape: &r.out_shape,
                    params: r.cost.params,
                    macs: r.cost.macs,
                })
                .collect();
            let v = serde_json::json!({"model": args.model, "input_size": [c, h, w], "layers": layers, "params": total.params, "macs": total.macs});
            outln!("{}", serde_json::to_string_pretty(&v)?);
        }
        Format::Table => {
            let mut body: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.name.clone(),
                        r.kind.clone(),
                        format!("{:?}", r.out_shape),
                        r.cost.params.to_string(),
                        r.cost.macs.to_string(),
                    ]
                })
                .collect();
            body.push(vec![
                "total".into(),
                String::new(),
                String::new(),
                total.params.to_string(),
                total.macs.to_string(),
            ]);
            outln!("{} at input {c}x{h}x{w}", args.model);
            outln!("{}", table(&["layer", "kind", "output", "params", "MACs"], &body));
        }
    }
    Ok(())
}

/// Arguments of `lean predict`.
#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Model name (with a weights file; an exported folder names its own model).
    #[arg(long)]
    model: Option<String>,
    /// Weights (safetensors, torchvision names) or a folder made by `lean export` (its
    /// config.json then gives the model, normalisation and class names).
    #[arg(long)]
    weights: PathBuf,
    /// Input tensor file: its tensor `input` (N, C, H, W) is used.
    #[arg(long, conflicts_with = "images")]
    tensor: Option<PathBuf>,
    /// Where to write the logits (tensor `output`) with --tensor.
    #[arg(long, requires = "tensor")]
    output: Option<PathBuf>,
    /// How many classes to print per image.
    #[arg(long, default_value_t = 5)]
    topk: usize,
    #[command(flatten)]
    opts: ModelOptions,
    /// Image files (PNG, JPEG), preprocessed as `lean eval` does: normalised, and resized +
    /// centre-cropped (crop 0.875) when not already at the model's input size.
    images: Vec<PathBuf>,
}

/// Reads an image as `lean eval` would feed it: resized and centre-cropped to `size` (unless
/// already that size; `None`: kept as it is), normalised.
fn load_image(path: &Path, c: usize, size: Option<(usize, usize)>, mean: &[f32], std: &[f32]) -> Result<Tensor> {
    if c != 1 && c != 3 {
        bail!("images need a 1- or 3-channel model, this one takes {c} channels");
    }
    let image = lean_data::decode_image(path, c)?;
    let mut steps = vec![];
    if let Some((h, w)) = size.filter(|&s| s != (image.h, image.w)) {
        steps.push(Transform::ResizeCenterCrop {
            size: (h, w),
            crop_pct: 0.875,
        });
    }
    steps.push(Transform::Normalize {
        mean: mean.to_vec(),
        std: std.to_vec(),
    });
    let sample = lean_data::Sample {
        image,
        target: lean_data::Target::Class(0),
    };
    // The eval transforms draw no random numbers; the generator is only the interface's.
    let item = Pipeline(steps).apply(
        &sample,
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0),
    );
    let FImage { c, h, w, data } = item.image;
    Ok(Tensor::from_vec(data, (1, c, h, w), &Device::Cpu)?)
}

/// Entry point of `lean predict`.
pub fn predict(args: &PredictArgs) -> Result<()> {
    let (model, input_size, mean, std, labels) = if args.weights.is_dir() {
        // An exported folder: its config gives the model, normalisation and class names.
        let (m, cfg) = pretrained::load_dir(&args.weights, &Device::Cpu)
            .with_context(|| format!("cannot load {}", args.weights.display()))?;
        if let Some(name) = args.model.as_ref().filter(|n| **n != cfg.model.name) {
            bail!(
                "--model {name} contradicts {}, which holds a {}",
                args.weights.display(),
                cfg.model.name
            );
        }
        (
            m,
            cfg.data.input_size,
            cfg.data.mean,
            cfg.data.std,
            cfg.data.label_names,
        )
    } else {
        let name = args.model.as_deref().context("--weights FILE needs --model")?;
        let info = describe(name)?;
        if !args.weights.is_file() {
            bail!("weights file {} does not exist", args.weights.display());
        }
        let vb = pretrained::load_weights(&args.weights, &Device::Cpu)?;
        let m = create_model(name, &args.opts, vb)
            .with_context(|| format!("weights {} do not fit model {name}", args.weights.display()))?;
        let mut size = info.input_size;
        size[0] = args.opts.in_channels.unwrap_or(size[0]);
        let ch = size[0];
        (
            m,
            size,
            info.mean[..ch.min(3)].to_vec(),
            info.std[..ch.min(3)].to_vec(),
            vec![],
        )
    };
    if let Some(t) = &args.tensor {
        let tensors =
            candle_core::safetensors::load(t, &Device::Cpu).with_context(|| format!("cannot read {}", t.display()))?;
        let input = tensors
            .get("input")
            .with_context(|| format!("{} has no tensor named `input`", t.display()))?;
        let input = input.to_dtype(DType::F32)?;
        if input.rank() != 4 {
            bail!(
                "{}: tensor `input` must be (N, C, H, W), got shape {:?}",
                t.display(),
                input.dims()
            );
        }
        let finite = input.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite());
        if !finite {
            bail!("{}: tensor `input` holds NaN or infinite values", t.display());
        }
        let logits = model.forward_t(&input, false)?;
        match &args.output {
            Some(out) => {
                let tensors = std::collections::HashMap::from([("output".to_string(), logits)]);
                lean_models::fs::write_atomic_with(out, |tmp| candle_core::safetensors::save(&tensors, tmp))
                    .map_err(|(p, msg)| anyhow::anyhow!("cannot write {}: {msg}", p.display()))?;
                outln!("wrote logits to {}", out.display());
            }
            None => print_topk(&logits, args.topk, &[t.display().to_string()], &labels)?,
        }
        return Ok(());
    }
    if args.images.is_empty() {
        bail!("give --tensor FILE or one or more image files");
    }
    let [c, h, w] = input_size;
    if mean.len() != c || std.len() != c {
        bail!("the normalisation has {} channels, the model takes {c}", mean.len());
    }
    if model.is_segmentation() {
        return predict_masks(model.as_ref(), &args.images, c, &mean, &std);
    }
    let batch: Vec<Tensor> = args
        .images
        .iter()
        .map(|p| load_image(p, c, Some((h, w)), &mean, &std))
        .collect::<Result<_>>()?;
    let logits = model.forward_t(&Tensor::cat(&batch, 0)?, false)?;
    let names: Vec<String> = args.images.iter().map(|p| p.display().to_string()).collect();
    print_topk(&logits, args.topk, &names, &labels)
}

/// A distinct colour per class (class 0, the background, black).
fn class_colour(c: u32) -> [u8; 3] {
    if c == 0 {
        return [0, 0, 0];
    }
    let h = (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    [(h >> 56) as u8 | 0x40, (h >> 48) as u8 | 0x40, (h >> 40) as u8 | 0x40]
}

/// Segmentation: for each image writes `<stem>.mask.png` (colourised classes) and
/// `<stem>.overlay.png` (the mask blended over the image) beside it.
fn predict_masks(model: &dyn Model, images: &[PathBuf], channels: usize, mean: &[f32], std: &[f32]) -> Result<()> {
    for path in images {
        let img = image::open(path).with_context(|| format!("cannot read image {}", path.display()))?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        let x = load_image(path, channels, None, mean, std)?;
        let pred = model.forward_t(&x, false)?.argmax(1)?.flatten_all()?.to_vec1::<u32>()?;
        let mut mask = image::RgbImage::new(w as u32, h as u32);
        let mut overlay = img.to_rgb8();
        for (i, c) in pred.iter().enumerate() {
            let (px, py) = ((i % w) as u32, (i / w) as u32);
            let col = class_colour(*c);
            mask.put_pixel(px, py, image::Rgb(col));
            if *c != 0 {
                let o = overlay.get_pixel_mut(px, py);
                for k in 0..3 {
                    o.0[k] = ((o.0[k] as u16 + col[k] as u16) / 2) as u8;
                }
            }
        }
        let stem = path.with_extension("");
        let (mp, op) = (stem.with_extension("mask.png"), stem.with_extension("overlay.png"));
        mask.save(&mp)
            .with_context(|| format!("cannot write {}", mp.display()))?;
        overlay
            .save(&op)
            .with_context(|| format!("cannot write {}", op.display()))?;
        let mut counts = std::collections::BTreeMap::new();
        for c in &pred {
            *counts.entry(*c).or_insert(0usize) += 1;
        }
        outln!(
            "{}: wrote {} and {} (pixels per class {counts:?})",
            path.display(),
            mp.display(),
            op.display()
        );
    }
    Ok(())
}

fn print_topk(logits: &Tensor, k: usize, names: &[String], labels: &[String]) -> Result<()> {
    let probs = candle_nn::ops::softmax(logits, 1)?.to_vec2::<f32>()?;
    for (i, p) in probs.iter().enumerate() {
        let mut idx: Vec<usize> = (0..p.len()).collect();
        idx.sort_by(|a, b| p[*b].total_cmp(&p[*a]));
        let name = names.get(i).or(names.first()).cloned().unwrap_or_default();
        let top: Vec<String> = idx
            .iter()
            .take(k)
            .map(|&c| match labels.get(c) {
                Some(l) => format!("{l} ({:.1}%)", 100.0 * p[c]),
                None => format!("class {c} ({:.1}%)", 100.0 * p[c]),
            })
            .collect();
        outln!("{name}[{i}]: {}", top.join(", "));
    }
    Ok(())
}
