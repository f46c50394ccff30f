//! `lean models`, `lean info`, `lean predict`.

use crate::model_args::{parse_input_size, ModelArgs};
use crate::output::{table, Format};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clap::Args;
use lean_models::{create_model, describe, list_models, Model};
use serde::Serialize;
use std::path::PathBuf;

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

fn build(name: &str, args: &ModelArgs) -> Result<Box<dyn Model>> {
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    Ok(create_model(name, &args.options()?, vb)?)
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
        let model = build(&info.name, &ModelArgs::default())?;
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
        Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
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
            println!("{}", table(&["name", "family", "input", "params", "MACs"], &body));
            println!("\nLean models take tags: NAME.TAG with TAG from a stencil (five|four|h3|v3|full), g<N>, dd, joined by `_`.");
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
    opts: ModelArgs,
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
            println!("{}", serde_json::to_string_pretty(&v)?);
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
            println!("{} at input {c}x{h}x{w}", args.model);
            println!("{}", table(&["layer", "kind", "output", "params", "MACs"], &body));
        }
    }
    Ok(())
}

/// Arguments of `lean predict`.
#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Model name.
    #[arg(long)]
    model: String,
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
    opts: ModelArgs,
    /// Image files (PNG, JPEG), resized to the model's input size and normalised.
    images: Vec<PathBuf>,
}

fn load_image(path: &PathBuf, [c, h, w]: [usize; 3], mean: [f32; 3], std: [f32; 3]) -> Result<Tensor> {
    let img = image::open(path).with_context(|| format!("cannot read image {}", path.display()))?;
    let img = img.resize_exact(w as u32, h as u32, image::imageops::FilterType::Triangle);
    let data: Vec<f32> = if c == 1 {
        let g = img.to_luma8();
        g.pixels().map(|p| (p.0[0] as f32 / 255.0 - mean[0]) / std[0]).collect()
    } else if c == 3 {
        let rgb = img.to_rgb8();
        let mut v = vec![0f32; 3 * h * w];
        for (i, p) in rgb.pixels().enumerate() {
            for k in 0..3 {
                v[k * h * w + i] = (p.0[k] as f32 / 255.0 - mean[k]) / std[k];
            }
        }
        v
    } else {
        bail!("images need a 1- or 3-channel model, this one takes {c} channels");
    };
    Ok(Tensor::from_vec(data, (1, c, h, w), &Device::Cpu)?)
}

/// Entry point of `lean predict`.
pub fn predict(args: &PredictArgs) -> Result<()> {
    let info = describe(&args.model)?;
    let mut info = info;
    let mut labels: Vec<String> = vec![];
    let model = if args.weights.is_dir() {
        // An exported folder: its config gives the model, normalisation and class names.
        let (cfg, m) = crate::export_cmd::load_exported(&args.weights, &Device::Cpu)?;
        info = describe(&cfg.model.name)?;
        (info.input_size, info.mean, info.std) = (cfg.input_size, pad3(&cfg.mean), pad3(&cfg.std));
        labels = cfg.label_names;
        m
    } else {
        if !args.weights.is_file() {
            bail!("weights file {} does not exist", args.weights.display());
        }
        let vb = crate::export_cmd::load_weights(&args.weights, &Device::Cpu)?;
        create_model(&args.model, &args.opts.options()?, vb)
            .with_context(|| format!("weights {} do not fit model {}", args.weights.display(), args.model))?
    };
    if let Some(t) = &args.tensor {
        let tensors =
            candle_core::safetensors::load(t, &Device::Cpu).with_context(|| format!("cannot read {}", t.display()))?;
        let input = tensors
            .get("input")
            .with_context(|| format!("{} has no tensor named `input`", t.display()))?;
        let logits = model.forward_t(&input.to_dtype(DType::F32)?, false)?;
        match &args.output {
            Some(out) => {
                let tmp = out.with_extension("safetensors.partial");
                candle_core::safetensors::save(
                    &std::collections::HashMap::from([("output".to_string(), logits)]),
                    &tmp,
                )?;
                std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
                println!("wrote logits to {}", out.display());
            }
            None => print_topk(&logits, args.topk, &[t.display().to_string()], &labels)?,
        }
        return Ok(());
    }
    if args.images.is_empty() {
        bail!("give --tensor FILE or one or more image files");
    }
    let mut size = info.input_size;
    if !args.weights.is_dir() {
        size[0] = args.opts.in_channels.unwrap_or(size[0]);
    }
    if model.is_segmentation() {
        return predict_masks(model.as_ref(), &args.images, size[0], &info);
    }
    let batch: Vec<Tensor> = args
        .images
        .iter()
        .map(|p| load_image(p, size, info.mean, info.std))
        .collect::<Result<_>>()?;
    let logits = model.forward_t(&Tensor::cat(&batch, 0)?, false)?;
    let names: Vec<String> = args.images.iter().map(|p| p.display().to_string()).collect();
    print_topk(&logits, args.topk, &names, &labels)
}

/// A per-channel constant for 1 or 3 channels.
fn pad3(v: &[f32]) -> [f32; 3] {
    [v[0], v[1 % v.len()], v[2 % v.len()]]
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
fn predict_masks(model: &dyn Model, images: &[PathBuf], channels: usize, info: &lean_models::ModelInfo) -> Result<()> {
    for path in images {
        let img = image::open(path).with_context(|| format!("cannot read image {}", path.display()))?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        let x = load_image(path, [channels, h, w], info.mean, info.std)?;
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
        println!(
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
        println!("{name}[{i}]: {}", top.join(", "));
    }
    Ok(())
}
