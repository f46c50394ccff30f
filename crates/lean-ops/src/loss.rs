//! Cross-entropy over (N, C) or (N, C, H, W) logits with label smoothing and an ignore index.

use crate::error::{check_float, config_err, shape_err, Result};
use crate::real::{dispatch, dispatch_dtype, slice, tensor, with_data, Real};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Options of [`cross_entropy`] (PyTorch's `F.cross_entropy` with mean reduction).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropyConfig {
    /// ε: the target is (1 - ε)·one-hot + ε/C.
    pub label_smoothing: f64,
    /// Targets equal to this are skipped (PyTorch: -100; segmentation: 255).
    pub ignore_index: Option<i64>,
}

impl Default for CrossEntropyConfig {
    fn default() -> Self {
        CrossEntropyConfig {
            label_smoothing: 0.0,
            ignore_index: Some(-100),
        }
    }
}

struct CrossEntropyOp {
    cfg: CrossEntropyConfig,
    targets: Vec<i64>,
    n: usize,
    c: usize,
    s: usize,
}

impl CrossEntropyOp {
    fn ignored(&self, t: i64) -> bool {
        self.cfg.ignore_index == Some(t)
    }
    fn count(&self) -> usize {
        self.targets.iter().filter(|t| !self.ignored(**t)).count()
    }
    /// Log-sum-exp of the logits of position (n, ·, s).
    fn lse<T: Real>(&self, z: &[T], n: usize, s: usize) -> f64 {
        let at = |k: usize| z[(n * self.c + k) * self.s + s].f();
        let m = (0..self.c).map(at).fold(f64::NEG_INFINITY, f64::max);
        m + (0..self.c).map(|k| (at(k) - m).exp()).sum::<f64>().ln()
    }
    fn forward<T: Real>(&self, z: &[T]) -> f64 {
        let eps = self.cfg.label_smoothing;
        // Per-sample sums in parallel, added in order: reproducible whatever the scheduling.
        let per_sample: Vec<f64> = (0..self.n)
            .into_par_iter()
            .map(|n| {
                (n * self.s..(n + 1) * self.s)
                    .map(|p| {
                        let (n, s) = (p / self.s, p % self.s);
                        let t = self.targets[p];
                        if self.ignored(t) {
                            return 0.0;
                        }
                        let lse = self.lse(z, n, s);
                        let at = |k: usize| z[(n * self.c + k) * self.s + s].f();
                        let nll = lse - at(t as usize);
                        let smooth = lse - (0..self.c).map(at).sum::<f64>() / self.c as f64;
                        (1.0 - eps) * nll + eps * smooth
                    })
                    .sum::<f64>()
            })
            .collect();
        let total: f64 = per_sample.iter().sum();
        let cnt = self.count();
        if cnt == 0 {
            0.0
        } else {
            total / cnt as f64
        }
    }
    fn backward<T: Real>(&self, z: &[T], g: f64) -> Vec<T> {
        let eps = self.cfg.label_smoothing;
        let cnt = self.count().max(1) as f64;
        let mut gz = vec![T::zero(); z.len()];
        // One chunk per sample: positions (n, ·, ·).
        gz.par_chunks_mut(self.c * self.s).enumerate().for_each(|(n, gn)| {
            for s in 0..self.s {
                let t = self.targets[n * self.s + s];
                if self.ignored(t) {
                    continue;
                }
                let lse = self.lse(z, n, s);
                for k in 0..self.c {
                    let p = (z[(n * self.c + k) * self.s + s].f() - lse).exp();
                    let target = eps / self.c as f64 + if k as i64 == t { 1.0 - eps } else { 0.0 };
                    gn[k * self.s + s] = T::from_f64(g * (p - target) / cnt);
                }
            }
        });
        gz
    }
}

// A plain candle op, not a `CpuOp2`: its second input holds integer class targets, not the
// logits' float type.
impl CustomOp2 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s1, |T| {
            let v = self.forward(slice::<T>(s1, l1)?);
            Ok((T::to_cpu_storage_owned(vec![T::from_f64(v)]), Shape::from(())))
        })
    }
    fn bwd(
        &self,
        z: &Tensor,
        _t: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        dispatch_dtype!(self.name(), z.dtype(), |T| with_data::<T, _>(z, |zs| Ok((
            Some(tensor(self.backward(zs, g), z.dims())?),
            None
        ))))
    }
}

/// Checks shapes and reads the targets; returns (targets, N, C, S).
pub(crate) fn read_targets(
    logits: &Tensor,
    targets: &Tensor,
    cfg: &CrossEntropyConfig,
) -> Result<(Vec<i64>, usize, usize, usize)> {
    const OP: &str = "cross_entropy";
    let d = logits.dims();
    if d.len() < 2 {
        return Err(shape_err(
            OP,
            format!("logits must be (N, C) or (N, C, H, W), got {d:?}"),
        ));
    }
    let (n, c, s) = (d[0], d[1], d[2..].iter().product::<usize>());
    let mut want = vec![n];
    want.extend_from_slice(&d[2..]);
    if targets.dims() != want {
        return Err(shape_err(
            OP,
            format!(
                "targets must have shape {want:?} for logits {d:?}, got {:?}",
                targets.dims()
            ),
        ));
    }
    if !(0.0..=1.0).contains(&cfg.label_smoothing) {
        return Err(config_err(
            OP,
            format!("label_smoothing must be in [0, 1], got {}", cfg.label_smoothing),
        ));
    }
    let t: Vec<i64> = match targets.dtype() {
        DType::U8 | DType::U32 | DType::I64 | DType::I32 | DType::I16 => {
            targets.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?
        }
        dt => {
            return Err(shape_err(
                OP,
                format!("targets must be integer class indices, got dtype {dt:?}"),
            ))
        }
    };
    if let Some(bad) = t
        .iter()
        .find(|&&v| cfg.ignore_index != Some(v) && (v < 0 || v >= c as i64))
    {
        return Err(shape_err(OP, format!("target {bad} is out of range for {c} classes")));
    }
    Ok((t, n, c, s))
}

/// Mean cross-entropy of `logits` (N, C) or (N, C, H, W) against integer `targets` (N) or
/// (N, H, W), with label smoothing and an ignore index, as PyTorch's `F.cross_entropy`
/// (the mean over non-ignored positions; 0 when every position is ignored).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, cfg: &CrossEntropyConfig) -> Result<Tensor> {
    check_float("cross_entropy", logits)?;
    let (t, n, c, s) = read_targets(logits, targets, cfg)?;
    if logits.device().is_cpu() {
        let op = CrossEntropyOp {
            cfg: *cfg,
            targets: t,
            n,
            c,
            s,
        };
        Ok(logits.contiguous()?.apply_op2(targets, op)?)
    } else {
        crate::reference::cross_entropy(logits, targets, cfg)
    }
}
