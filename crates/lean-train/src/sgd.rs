//! SGD with momentum, dampening, Nesterov and weight decay, as `torch.optim.SGD`.

use crate::optim::{OptimState, Optimizer as LeanOptimizer, Param};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Storage, Tensor, Var, WithDType};
use rayon::prelude::*;
use std::cell::RefCell;

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
            if in_place_cpu_step(p, g, momentum_buffer, &c, s.decay)? {
                continue;
            }
            let mut d = if s.decay && c.weight_decay != 0.0 {
                (g + (p * c.weight_decay)?)?
            } else {
                g.clone()
            };
            if c.momentum != 0.0 {
                let buf = match &momentum_buffer {
                    // Own storage: d may be the gradient itself, and the buffer is updated in place later.
                    None => d.copy()?,
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

/// Elements per parallel task of the in-place update.
const STEP_CHUNK: usize = 1 << 15;

/// The whole update of one parameter, in place and in one pass over its memory (parameter,
/// gradient and momentum buffer read once, parameter and buffer written once), on the CPU for
/// contiguous f32/f64 tensors of distinct storage. Returns false where it does not apply (the
/// composite path runs). The element operations and their order are those of the composite path
/// (and of candle's scalar ops: `t * s` is `t·s + 0`), so both give the same bits; the composite
/// path allocates a tensor per operation and `Var::set` copies the result back. Writing in place
/// is what `Var::set` does too: views of the parameter see the new values either way.
fn in_place_cpu_step(p: &Tensor, g: &Tensor, buf: &mut Option<Tensor>, c: &SgdConfig, decay: bool) -> Result<bool> {
    let simple =
        |t: &Tensor| t.device().is_cpu() && t.dtype() == p.dtype() && t.is_contiguous() && t.dims() == p.dims();
    if !simple(p) || !simple(g) || !buf.as_ref().is_none_or(simple) || !matches!(p.dtype(), DType::F32 | DType::F64) {
        return Ok(false);
    }
    let momentum = c.momentum != 0.0;
    // The first momentum step stores d itself as the buffer: start from zeros and say so.
    let first = momentum && buf.is_none();
    if first {
        *buf = Some(p.zeros_like()?);
    }
    let b = if momentum { buf.as_ref() } else { None };
    // The nested in-place ops below lock the parameter's storage while the gradient's and the
    // buffer's are held: three distinct allocations, or the composite path (a lock taken twice
    // would deadlock). A gradient never shares a parameter's storage in practice; this keeps
    // a hand-built gradient store safe.
    let starts = [Some(p), Some(g), b].map(|t| t.map(storage_start));
    let distinct = |a: Option<usize>, b: Option<usize>| a.is_none() || b.is_none() || a != b;
    if !distinct(starts[0], starts[1]) || !distinct(starts[0], starts[2]) || !distinct(starts[1], starts[2]) {
        if first {
            *buf = None;
        }
        return Ok(false);
    }
    p.inplace_op2(
        g,
        &ParamPass {
            buf: b,
            c,
            decay,
            first,
        },
    )?;
    Ok(true)
}

/// The address of a CPU tensor's storage (its first element); distinct storages have distinct
/// addresses since each owns its allocation.
fn storage_start(t: &Tensor) -> usize {
    let (st, _) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(CpuStorage::F32(v)) => v.as_ptr() as usize,
        Storage::Cpu(CpuStorage::F64(v)) => v.as_ptr() as usize,
        _ => 0,
    }
}

/// The f32/f64 element types of the in-place update, with mutable access to their storage.
trait StepFloat:
    WithDType + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self> + std::ops::Mul<Output = Self>
{
    fn host(s: &CpuStorage) -> Result<&[Self]> {
        s.as_slice::<Self>()
    }
    fn host_mut(s: &mut CpuStorage) -> Result<&mut [Self]>;
}
impl StepFloat for f32 {
    fn host_mut(s: &mut CpuStorage) -> Result<&mut [f32]> {
        match s {
            CpuStorage::F32(v) => Ok(v),
            _ => candle_core::bail!("sgd: expected f32 storage"),
        }
    }
}
impl StepFloat for f64 {
    fn host_mut(s: &mut CpuStorage) -> Result<&mut [f64]> {
        match s {
            CpuStorage::F64(v) => Ok(v),
            _ => candle_core::bail!("sgd: expected f64 storage"),
        }
    }
}

/// The contiguous elements a layout selects.
fn span(l: &Layout) -> std::ops::Range<usize> {
    l.start_offset()..l.start_offset() + l.shape().elem_count()
}

/// The update rule of one element, as the composite path computes it.
struct Rule<T> {
    wd: T,
    m: T,
    damp: T,
    lr: T,
    decay: bool,
    nesterov: bool,
    first: bool,
}

impl<T: StepFloat> Rule<T> {
    fn new(c: &SgdConfig, decay: bool, first: bool) -> Self {
        let k = |v: f64| <T as WithDType>::from_f64(v);
        Rule {
            wd: k(c.weight_decay),
            m: k(c.momentum),
            damp: k(1.0 - c.dampening),
            lr: k(c.lr),
            decay: decay && c.weight_decay != 0.0,
            nesterov: c.nesterov,
            first,
        }
    }

    /// (new p, new buffer) from p, its gradient and the old buffer; the flags are constants so
    /// that each combination compiles to its own branch-free, vectorised loop.
    #[inline(always)]
    fn apply<const DECAY: bool, const MOMENTUM: bool, const NESTEROV: bool, const FIRST: bool>(
        &self,
        p: T,
        g: T,
        b: T,
    ) -> (T, T) {
        let zero = T::zero();
        let mut d = if DECAY { g + (p * self.wd + zero) } else { g };
        let mut b_new = zero;
        if MOMENTUM {
            b_new = if FIRST {
                d
            } else {
                (b * self.m + zero) + (d * self.damp + zero)
            };
            d = if NESTEROV { d + (b_new * self.m + zero) } else { b_new };
        }
        (p - (d * self.lr + zero), b_new)
    }

    /// The update over whole slices (`b` given exactly with momentum), in parallel chunks.
    fn run(&self, p: &mut [T], g: &[T], b: Option<&mut [T]>) {
        match (self.decay, self.nesterov, self.first) {
            (false, false, false) => self.run_with::<false, false, false>(p, g, b),
            (false, false, true) => self.run_with::<false, false, true>(p, g, b),
            (false, true, false) => self.run_with::<false, true, false>(p, g, b),
            (false, true, true) => self.run_with::<false, true, true>(p, g, b),
            (true, false, false) => self.run_with::<true, false, false>(p, g, b),
            (true, false, true) => self.run_with::<true, false, true>(p, g, b),
            (true, true, false) => self.run_with::<true, true, false>(p, g, b),
            (true, true, true) => self.run_with::<true, true, true>(p, g, b),
        }
    }

    fn run_with<const DECAY: bool, const NESTEROV: bool, const FIRST: bool>(
        &self,
        p: &mut [T],
        g: &[T],
        b: Option<&mut [T]>,
    ) {
        match b {
            Some(b) => p
                .par_chunks_mut(STEP_CHUNK)
                .zip(b.par_chunks_mut(STEP_CHUNK))
                .zip(g.par_chunks(STEP_CHUNK))
                .for_each(|((p, b), g)| {
                    for ((p, b), g) in p.iter_mut().zip(b.iter_mut()).zip(g) {
                        (*p, *b) = self.apply::<DECAY, true, NESTEROV, FIRST>(*p, *g, *b);
                    }
                }),
            None => p
                .par_chunks_mut(STEP_CHUNK)
                .zip(g.par_chunks(STEP_CHUNK))
                .for_each(|(p, g)| {
                    for (p, g) in p.iter_mut().zip(g) {
                        *p = self.apply::<DECAY, false, false, false>(*p, *g, T::zero()).0;
                    }
                }),
        }
    }
}

/// In place on the parameter, reading its gradient; with momentum it opens the buffer in place
/// as well ([`BufferPass`]) and runs the joint update there.
struct ParamPass<'a> {
    buf: Option<&'a Tensor>,
    c: &'a SgdConfig,
    decay: bool,
    first: bool,
}

impl ParamPass<'_> {
    fn step<T: StepFloat>(&self, p: &mut CpuStorage, pl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let p = &mut T::host_mut(p)?[span(pl)];
        let g = &T::host(g)?[span(gl)];
        let rule = Rule::<T>::new(self.c, self.decay, self.first);
        match self.buf {
            Some(buf) => buf.inplace_op1(&BufferPass {
                p: RefCell::new(p),
                g,
                rule,
            }),
            None => {
                rule.run(p, g, None);
                Ok(())
            }
        }
    }
}

impl InplaceOp2 for ParamPass<'_> {
    fn name(&self) -> &'static str {
        "sgd-step"
    }
    fn cpu_fwd(&self, p: &mut CpuStorage, pl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        match p {
            CpuStorage::F32(_) => self.step::<f32>(p, pl, g, gl),
            CpuStorage::F64(_) => self.step::<f64>(p, pl, g, gl),
            _ => candle_core::bail!("sgd-step: expected f32 or f64 storage"),
        }
    }
}

/// In place on the momentum buffer, with the parameter's slice (opened by [`ParamPass`]).
struct BufferPass<'a, T> {
    p: RefCell<&'a mut [T]>,
    g: &'a [T],
    rule: Rule<T>,
}

impl<T: StepFloat> InplaceOp1 for BufferPass<'_, T> {
    fn name(&self) -> &'static str {
        "sgd-step-momentum"
    }
    fn cpu_fwd(&self, b: &mut CpuStorage, bl: &Layout) -> Result<()> {
        let b = &mut T::host_mut(b)?[span(bl)];
        self.rule.run(&mut self.p.borrow_mut(), self.g, Some(b));
        Ok(())
    }
}
