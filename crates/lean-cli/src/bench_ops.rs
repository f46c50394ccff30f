//! `lean bench ops`: the lean convolution against candle's dense 3x3 and depthwise+1x1
//! convolutions, measured in one run.

use crate::output::{table, Format};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use clap::Args;
use lean_ops::channels_last::{lean_conv2d_nhwc, to_channels_last};
use lean_ops::{conv2d, lean_conv2d, LeanConv2dConfig, Stencil};
use serde::Serialize;
use std::time::Instant;

/// Arguments of `lean bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// `ops` for the operator benchmark, or model names (`lean models` lists them).
    #[arg(required = true)]
    what: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Models: CSV output (overrides --format).
    #[arg(long)]
    csv: bool,
    /// Timed repetitions per case (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Models: batch sizes (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 64])]
    batch_sizes: Vec<usize>,
    /// Models: input size C,H,W (default: the model's).
    #[arg(long)]
    input_size: Option<String>,
    /// Models: also time a training step (forward, backward, SGD update).
    #[arg(long)]
    train: bool,
    /// Models: the device (`cpu`, `cuda`, `cuda:N`, `metal`); `ops` runs on the CPU only.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    model_opts: lean_models::ModelOptions,
    /// Input shapes N,C,H,W, separated by `;` (default: the two shapes of docs/benchmarks.md).
    #[arg(long)]
    shapes: Option<String>,
    /// Only these ops (comma-separated): dense3x3, dense3x3_lean_ops, grouped+1x1, lean,
    /// lean_nhwc (the same lean convolution on a channels-last input).
    #[arg(long, value_delimiter = ',')]
    ops: Vec<String>,
}

/// One measured case; the JSON schema of `lean bench ops --format json`.
#[derive(Serialize, Debug, Clone)]
pub struct OpCase {
    op: String,
    stencil: Option<String>,
    group_size: Option<usize>,
    stride: usize,
    shape: [usize; 4],
    fwd_ms: f64,
    fwd_bwd_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median wall time in ms of `f` over `reps` runs after one warm-up.
fn time_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(v))
}

type Forward = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>>;

/// Times forward on plain tensors, and forward + backward of sum(y) on variables.
fn measure(reps: usize, params: &[Tensor], f: Forward) -> Result<(f64, f64)> {
    let fwd = time_ms(reps, || {
        f(params)?;
        Ok(())
    })?;
    let vars: Vec<Var> = params
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<_>>()?;
    let vt: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let fwd_bwd = time_ms(reps, || {
        let g = f(&vt)?.sum_all()?.backward()?;
        if g.get(&vt[0]).is_none() {
            bail!("no input gradient");
        }
        Ok(())
    })?;
    Ok((fwd, fwd_bwd))
}

fn parse_shapes(s: &str) -> Result<Vec<[usize; 4]>> {
    s.split(';')
        .map(|one| {
            let v: Vec<usize> = one
                .split(',')
                .map(|d| d.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("bad shape `{one}`: expected N,C,H,W"))?;
            match v[..] {
                [n, c, h, w] if n * c * h * w > 0 => Ok([n, c, h, w]),
                _ => bail!("bad shape `{one}`: expected four positive numbers N,C,H,W"),
            }
        })
        .collect()
}

/// The ops `lean bench ops` measures.
pub const OPS: [&str; 5] = ["dense3x3", "dense3x3_lean_ops", "grouped+1x1", "lean", "lean_nhwc"];

/// One op to measure: its name, stencil, group size, parameters (input first) and forward.
type Candidate = (&'static str, Option<Stencil>, Option<usize>, Vec<Tensor>, Forward);

/// Runs every case of `ops` (empty: all of [`OPS`]) on the CPU.
pub fn measure_ops(shapes: &[[usize; 4]], reps: usize, ops: &[String]) -> Result<Vec<OpCase>> {
    let dev = Device::Cpu;
    let mut out = vec![];
    for &shape @ [n, c, h, w] in shapes {
        for stride in [1usize, 2] {
            let x = Tensor::randn(0f32, 1., (n, c, h, w), &dev)?;
            let dense_w = (Tensor::randn(0f32, 1., (c, c, 3, 3), &dev)? * 0.05)?;
            let dw = (Tensor::randn(0f32, 1., (c, 1, 3, 3), &dev)? * 0.2)?;
            let pw = (Tensor::randn(0f32, 1., (c, c, 1, 1), &dev)? * 0.1)?;
            let cfg = LeanConv2dConfig::new(c, c)
                .stencil(Stencil::Five)
                .group_size(1)
                .stride(stride);
            let q = (Tensor::randn(0f32, 1., cfg.stencil_shape(), &dev)? * 0.2)?;
            let candidates: Vec<Candidate> = vec![
                (
                    "dense3x3",
                    None,
                    None,
                    vec![x.clone(), dense_w.clone()],
                    Box::new(move |p| p[0].conv2d(&p[1], 1, stride, 1, 1)),
                ),
                (
                    "dense3x3_lean_ops",
                    None,
                    None,
                    vec![x.clone(), dense_w],
                    Box::new(move |p| Ok(conv2d(&p[0], &p[1], None, stride, 1, 1)?)),
                ),
                (
                    "grouped+1x1",
                    Some(Stencil::Full),
                    Some(1),
                    vec![x.clone(), dw, pw.clone()],
                    Box::new(move |p| p[0].conv2d(&p[1], 1, stride, 1, c)? + p[0].conv2d(&p[2], 0, stride, 1, 1)?),
                ),
                (
                    "lean",
                    Some(Stencil::Five),
                    Some(1),
                    vec![x.clone(), pw.clone(), q.clone()],
                    Box::new(move |p| Ok(lean_conv2d(&p[0], &p[1], &p[2], None, &cfg)?)),
                ),
                (
                    "lean_nhwc",
                    Some(Stencil::Five),
                    Some(1),
                    vec![to_channels_last(&x)?, pw, q],
                    Box::new(move |p| Ok(lean_conv2d_nhwc(&p[0], &p[1], &p[2], None, &cfg)?)),
                ),
            ];
            for (op, stencil, group_size, params, f) in candidates {
                if !ops.is_empty() && !ops.iter().any(|o| o == op) {
                    continue;
                }
                let (fwd_ms, fwd_bwd_ms) = measure(reps, &params, f)?;
                let stencil = stencil.map(|s| s.to_string());
                out.push(OpCase {
                    op: op.into(),
                    stencil,
                    group_size,
                    stride,
                    shape,
                    fwd_ms,
                    fwd_bwd_ms,
                });
            }
        }
    }
    Ok(out)
}

/// The speed-up of `lean` over the other ops of the same shape and stride.
fn ratio_rows(cases: &[OpCase]) -> Vec<Vec<String>> {
    let mut rows = vec![];
    for lean in cases.iter().filter(|c| c.op == "lean") {
        for other in cases
            .iter()
            .filter(|c| c.op != "lean" && c.shape == lean.shape && c.stride == lean.stride)
        {
            rows.push(vec![
                format!("{:?}", lean.shape),
                lean.stride.to_string(),
                other.op.clone(),
                format!("{:.1}x", other.fwd_ms / lean.fwd_ms),
                format!("{:.1}x", other.fwd_bwd_ms / lean.fwd_bwd_ms),
            ]);
        }
    }
    rows
}

/// Entry point of `lean bench`.
pub fn run(args: &BenchArgs, tuned_allocator: bool) -> Result<()> {
    if args.reps == 0 {
        bail!("--reps must be at least 1");
    }
    if args.what.iter().any(|w| w != "ops") {
        if args.what.iter().any(|w| w == "ops") {
            bail!("`ops` and model names cannot be mixed in one `lean bench`");
        }
        if args.batch_sizes.is_empty() || args.batch_sizes.contains(&0) {
            bail!("--batch-sizes must be positive");
        }
        let input = crate::bench_models::input(&args.input_size)?;
        let dev = lean_train::parse_device(&args.device).with_context(|| format!("--device `{}`", args.device))?;
        let mut rows = vec![];
        for m in &args.what {
            rows.extend(crate::bench_models::bench_model(
                &dev,
                m,
                &args.model_opts,
                input,
                &args.batch_sizes,
                args.train,
                args.reps,
            )?);
        }
        return crate::bench_models::print(&rows, args.format, args.csv);
    }
    if args.device != "cpu" {
        bail!("--device `{}`: `lean bench ops` runs on the CPU only", args.device);
    }
    let shapes = match &args.shapes {
        Some(s) => parse_shapes(s)?,
        None => vec![[64, 64, 32, 32], [64, 256, 16, 16]],
    };
    if let Some(bad) = args.ops.iter().find(|o| !OPS.contains(&o.as_str())) {
        bail!("unknown op `{bad}` in --ops: expected some of {}", OPS.join(", "));
    }
    let cases = measure_ops(&shapes, args.reps, &args.ops)?;
    match args.format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&cases)?),
        Format::Table => {
            let rows: Vec<Vec<String>> = cases
                .iter()
                .map(|c| {
                    vec![
                        c.op.clone(),
                        c.stencil.clone().unwrap_or_else(|| "-".into()),
                        c.group_size.map_or("-".into(), |g| g.to_string()),
                        c.stride.to_string(),
                        format!("{:?}", c.shape),
                        format!("{:.2}", c.fwd_ms),
                        format!("{:.2}", c.fwd_bwd_ms),
                    ]
                })
                .collect();
            outln!(
                "{}",
                table(
                    &["op", "stencil", "g", "stride", "shape", "fwd_ms", "fwd_bwd_ms"],
                    &rows
                )
            );
            outln!("\nspeed-up of lean (other / lean, medians of {} runs):", args.reps);
            outln!(
                "{}",
                table(&["shape", "stride", "vs", "fwd", "fwd+bwd"], &ratio_rows(&cases))
            );
            outln!(
                "\n{} threads, f32, CPU; glibc allocator tuned: {tuned_allocator}",
                rayon_threads()
            );
        }
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
