//! `lean bench MODEL...`: inference and training-step latency and throughput per model and batch
//! size, with timm benchmark.py's keys.

use crate::model_args::parse_input_size;
use crate::output::{table, Format};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use lean_models::{create_model, describe, ModelOptions};
use lean_ops::{cross_entropy, CrossEntropyConfig};
use serde::Serialize;
use std::time::Instant;

/// One model at one batch size; the JSON of `lean bench --format json`.
#[derive(Serialize, Debug, Clone)]
pub struct ModelBench {
    /// Model name.
    pub model: String,
    /// Batch size.
    pub batch_size: usize,
    /// Input size (C, H, W).
    pub img_size: [usize; 3],
    /// Parameters.
    pub param_count: u64,
    /// MACs per image.
    pub macs: u64,
    /// Median inference time per batch, ms.
    pub infer_step_time: f64,
    /// Inference throughput.
    pub infer_samples_per_sec: f64,
    /// Median inference time per batch with every BatchNorm folded into its convolution (the
    /// deployment form, as ONNX Runtime runs it), ms.
    pub infer_folded_step_time: f64,
    /// The instruction set our kernels ran with (`lean_ops::isa`).
    pub isa: String,
    /// Median training step (forward, backward, SGD update), ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_step_time: Option<f64>,
    /// Training throughput.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_samples_per_sec: Option<f64>,
}

/// The median of `reps` timed calls of `f` after one untimed call. Each call runs with the
/// pool's threads kept awake (`with_workers_awake`), as a latency-critical caller would run it
/// and as PyTorch's OpenMP threads and ONNX Runtime's pool spin by default; on a GPU each call
/// ends when the device has finished its work.
fn median_ms(dev: &Device, reps: usize, mut f: impl FnMut() -> Result<()> + Send) -> Result<f64> {
    let mut call = || {
        lean_ops::runtime::with_workers_awake(&mut f)?;
        dev.synchronize().context("waiting for the device")
    };
    call()?;
    let mut v = vec![];
    for _ in 0..reps {
        let t = Instant::now();
        call()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

/// Benchmarks `name` at each batch size on `dev`.
pub fn bench_model(
    dev: &Device,
    name: &str,
    opts: &ModelOptions,
    input: Option<[usize; 3]>,
    batch_sizes: &[usize],
    with_train: bool,
    reps: usize,
) -> Result<Vec<ModelBench>> {
    let info = describe(name)?;
    let mut o = opts.clone();
    let [c, h, w] = input.unwrap_or([
        o.in_channels.unwrap_or(info.input_size[0]),
        info.input_size[1],
        info.input_size[2],
    ]);
    o.in_channels = Some(c);
    let dev = dev.clone();
    let vm = VarMap::new();
    let model = create_model(name, &o, lean_train::seeded_var_builder(&vm, 0, DType::F32, &dev))?;
    // Inference runs on plain tensors: no autograd graph is kept.
    let frozen: std::collections::HashMap<String, Tensor> = vm
        .data()
        .lock()
        .expect("lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let infer_model = create_model(
        name,
        &o,
        candle_nn::VarBuilder::from_tensors(frozen.clone(), DType::F32, &dev),
    )?;
    let mut folded_model = create_model(name, &o, candle_nn::VarBuilder::from_tensors(frozen, DType::F32, &dev))?;
    folded_model.fold_batchnorm()?;
    let cost = infer_model.cost(&[1, c, h, w])?;
    let groups = lean_train::ParamGroups::from_varmap(&vm, false);
    let mut out = vec![];
    for &b in batch_sizes {
        let x = Tensor::randn(0f32, 1., (b, c, h, w), &dev)?;
        let y = Tensor::from_vec((0..b as u32).map(|i| i % model.num_classes() as u32).collect(), b, &dev)?;
        let infer = median_ms(&dev, reps, || {
            infer_model.forward_t(&x, false)?;
            Ok(())
        })?;
        let infer_folded = median_ms(&dev, reps, || {
            folded_model.forward_t(&x, false)?;
            Ok(())
        })?;
        let train = if with_train {
            let cfg = lean_train::SgdConfig {
                lr: 1e-3,
                momentum: 0.9,
                ..Default::default()
            };
            let mut opt = lean_train::Sgd::with_groups(groups.decay.clone(), groups.no_decay.clone(), cfg)?;
            let ce = CrossEntropyConfig::default();
            Some(median_ms(&dev, reps, || {
                let loss = cross_entropy(&model.forward_t(&x, true)?, &y, &ce)?;
                lean_train::Optimizer::step(&mut opt, &loss.backward()?)?;
                Ok(())
            })?)
        } else {
            None
        };
        out.push(ModelBench {
            model: name.to_string(),
            batch_size: b,
            img_size: [c, h, w],
            param_count: cost.params,
            macs: cost.macs,
            infer_step_time: infer,
            infer_samples_per_sec: b as f64 / infer * 1e3,
            infer_folded_step_time: infer_folded,
            isa: lean_ops::isa::active().name().to_string(),
            train_step_time: train,
            train_samples_per_sec: train.map(|t| b as f64 / t * 1e3),
        });
    }
    Ok(out)
}

/// Prints the results.
pub fn print(rows: &[ModelBench], format: Format, csv: bool) -> Result<()> {
    if csv {
        outln!("model,batch_size,img_size,param_count,macs,infer_step_time,infer_samples_per_sec,train_step_time,train_samples_per_sec");
        for r in rows {
            let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
            outln!(
                "{},{},{}x{}x{},{},{},{:.3},{:.1},{},{}",
                r.model,
                r.batch_size,
                r.img_size[0],
                r.img_size[1],
                r.img_size[2],
                r.param_count,
                r.macs,
                r.infer_step_time,
                r.infer_samples_per_sec,
                opt(r.train_step_time),
                opt(r.train_samples_per_sec)
            );
        }
        return Ok(());
    }
    match format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(rows)?),
        Format::Table => {
            let body: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.model.clone(),
                        r.batch_size.to_string(),
                        format!("{:?}", r.img_size),
                        format!("{:.3} M", r.param_count as f64 / 1e6),
                        format!("{:.1} M", r.macs as f64 / 1e6),
                        format!("{:.2}", r.infer_step_time),
                        format!("{:.0}", r.infer_samples_per_sec),
                        format!("{:.2}", r.infer_folded_step_time),
                        r.train_step_time.map_or("-".into(), |t| format!("{t:.2}")),
                        r.train_samples_per_sec.map_or("-".into(), |t| format!("{t:.0}")),
                    ]
                })
                .collect();
            outln!(
                "{}",
                table(
                    &[
                        "model",
                        "batch",
                        "input",
                        "params",
                        "MACs",
                        "infer ms",
                        "infer img/s",
                        "folded ms",
                        "train ms",
                        "train img/s"
                    ],
                    &body
                )
            );
        }
    }
    Ok(())
}

/// Parses `--input-size`.
pub fn input(s: &Option<String>) -> Result<Option<[usize; 3]>> {
    s.as_deref().map(parse_input_size).transpose().context("--input-size")
}
