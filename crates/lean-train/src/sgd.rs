//! SGD with momentum, dampening, Nesterov and weight decay, as `torch.optim.SGD`.

use crate::optim::{OptimState, Optimizer as LeanOptimizer, Param};
use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Storage, Tensor, Var, WithDType};
use rayon::prelude::*;

/// Hyper-parameters of [`Sgd`] (PyTorch's names and defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0 = plain SGD).
    pub momentum: f64,
    /// Dampening of the momentum's gradient term.
    pub dampening: f64,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
    /// Nesterov momentum (needs momentum > 0 and dampening 0).
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 0.1,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

/// Stochastic gradient descent with PyTorch's update rule:
/// d = g + wd·p; b = μ·b + (1 - τ)·d (b = d on the first step); d = d + μ·b (Nesterov) or b;
/// p = p - lr·d.
#[derive(Debug)]
pub struct Sgd {
    /// Each parameter with its momentum buffer.
    slots: Vec<(Param, Option<Tensor>)>,
    cfg: SgdConfig,
}

impl Sgd {
    /// An optimizer that decays the parameters in `decay` and not those in `no_decay`.
    pub fn with_groups(decay: Vec<(String, Var)>, no_decay: Vec<(String, Var)>, cfg: SgdConfig) -> Result<Self> {
        if cfg.nesterov && (cfg.momentum <= 0.0 || cfg.dampening != 0.0) {
            candle_core::bail!("sgd: Nesterov momentum requires momentum > 0 and dampening 0, got {cfg:?}");
        }
        let slots = Param::slots(decay, no_decay);
        Ok(Sgd { slots, cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &SgdConfig {
        &self.cfg
    }
}

impl LeanOptimizer for Sgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let c = self.cfg;
        for (s, momentum_buffer) in self.slots.iter_mut() {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let p = s.var.as_tensor();
            if let Some((new_p, buf)) = fused_cpu_step(p, g, momentum_buffer.as_ref(), &c, s.decay)? {
                s.var.set(&new_p)?;
                *momentum_buffer = buf;
                continue;
            }
            let mut d = if s.decay && c.weight_decay != 0.0 {
                (g + (p * c.weight_decay)?)?
            } else {
                g.clone()
            };
            if c.momentum != 0.0 {
                let buf = match &momentum_buffer {
                    None => d.clone(),
                    Some(b) => ((b * c.momentum)? + (&d * (1.0 - c.dampening))?)?,
                };
                d = if c.nesterov {
                    (d + (&buf * c.momentum)?)?
                } else {
                    buf.clone()
                };
                *momentum_buffer = Some(buf.detach());
            }
            s.var.set(&(p - (d * c.lr)?)?)?;
        }
        Ok(())
    }
    fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }
    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
    fn state(&self) -> OptimState {
        let mut st = OptimState::default();
        for (s, buf) in &self.slots {
            s.save(&mut st, "momentum_buffer", buf.as_ref());
        }
        st
    }
    fn load_state(&mut self, st: &OptimState) -> Result<()> {
        for (s, buf) in self.slots.iter_mut() {
            *buf = s.load("sgd", st, "momentum_buffer")?;
        }
        Ok(())
    }
}

/// Elements per parallel task of the fused update.
const STEP_CHUNK: usize = 1 << 15;

/// The whole update of one parameter in one pass over its memory, on the CPU for contiguous
/// f32/f64 tensors (`None` elsewhere: the composite path runs). The element operations and their
/// order are those of the composite path (and of candle's scalar ops: `t * s` is `t·s + 0`), so
/// both give the same bits; the composite path allocates a tensor per operation.
/// The contiguous data of a CPU tensor.
fn cpu_slice<'a, T: WithDType>(st: &'a Storage, l: &candle_core::Layout) -> Result<&'a [T]> {
    match st {
        Storage::Cpu(cs) => Ok(&cs.as_slice::<T>()?[l.start_offset()..l.start_offset() + l.shape().elem_count()]),
        _ => candle_core::bail!("sgd: expected a CPU tensor"),
    }
}

fn fused_cpu_step(
    p: &Tensor,
    g: &Tensor,
    buf: Option<&Tensor>,
    c: &SgdConfig,
    decay: bool,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let simple =
        |t: &Tensor| t.device().is_cpu() && t.dtype() == p.dtype() && t.is_contiguous() && t.dims() == p.dims();
    if !simple(p) || !simple(g) || !buf.is_none_or(simple) {
        return Ok(None);
    }
    match p.dtype() {
        DType::F32 => fused::<f32>(p, g, buf, c, decay).map(Some),
        DType::F64 => fused::<f64>(p, g, buf, c, decay).map(Some),
        _ => Ok(None),
    }
}

fn fused<T: WithDType + std::ops::Add<Output = T> + std::ops::Sub<Output = T> + std::ops::Mul<Output = T>>(
    p: &Tensor,
    g: &Tensor,
    buf: Option<&Tensor>,
    c: &SgdConfig,
    decay: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (ps, gs) = (p.storage_and_layout(), g.storage_and_layout());
    let bs = buf.map(|b| b.storage_and_layout());
    let (pv, gv) = (cpu_slice::<T>(&ps.0, ps.1)?, cpu_slice::<T>(&gs.0, gs.1)?);
    let bv = match &bs {
        Some((st, l)) => Some(cpu_slice::<T>(st, l)?),
        None => None,
    };
    let k = |v: f64| <T as WithDType>::from_f64(v);
    let zero = k(0.0);
    let (wd, m, damp, lr) = (k(c.weight_decay), k(c.momentum), k(1.0 - c.dampening), k(c.lr));
    let decay = decay && c.weight_decay != 0.0;
    let momentum = c.momentum != 0.0;
    let n = pv.len();
    let mut new_p = vec![zero; n];
    let mut new_b = vec![zero; if momentum { n } else { 0 }];
    // One element: (new p, new buffer). The flags are loop-invariant (the compiler unswitches
    // them) and the chunks are zipped, not indexed, so the loop vectorises.
    let update = |p: T, g: T, b: Option<T>| -> (T, T) {
        let mut d = if decay { g + (p * wd + zero) } else { g };
        let mut b_new = zero;
        if momentum {
            b_new = match b {
                None => d,
                Some(b) => (b * m + zero) + (d * damp + zero),
            };
            d = if c.nesterov { d + (b_new * m + zero) } else { b_new };
        }
        (p - (d * lr + zero), b_new)
    };
    let inputs = pv.par_chunks(STEP_CHUNK).zip(gv.par_chunks(STEP_CHUNK));
    match (momentum, bv) {
        (true, Some(bv)) => new_p
            .par_chunks_mut(STEP_CHUNK)
            .zip(new_b.par_chunks_mut(STEP_CHUNK))
            .zip(inputs.zip(bv.par_chunks(STEP_CHUNK)))
            .for_each(|((po, bo), ((pc, gc), bc))| {
                for ((((po, bo), p), g), b) in po.iter_mut().zip(bo.iter_mut()).zip(pc).zip(gc).zip(bc) {
                    (*po, *bo) = update(*p, *g, Some(*b));
                }
            }),
        (true, None) => new_p
            .par_chunks_mut(STEP_CHUNK)
            .zip(new_b.par_chunks_mut(STEP_CHUNK))
            .zip(inputs)
            .for_each(|((po, bo), (pc, gc))| {
                for (((po, bo), p), g) in po.iter_mut().zip(bo.iter_mut()).zip(pc).zip(gc) {
                    (*po, *bo) = update(*p, *g, None);
                }
            }),
        (false, _) => new_p.par_chunks_mut(STEP_CHUNK).zip(inputs).for_each(|(po, (pc, gc))| {
            for ((po, p), g) in po.iter_mut().zip(pc).zip(gc) {
                *po = update(*p, *g, None).0;
            }
        }),
    }
    let dev = p.device();
    let new_p = Tensor::from_vec(new_p, p.shape(), dev)?;
    let new_b = if momentum {
        Some(Tensor::from_vec(new_b, p.shape(), dev)?)
    } else {
        None
    };
    Ok((new_p, new_b))
}
