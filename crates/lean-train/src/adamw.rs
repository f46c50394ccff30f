//! AdamW (decoupled weight decay), as `torch.optim.AdamW`, with saveable state.

use crate::optim::{OptimState, Optimizer};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// Hyper-parameters of [`AdamW`] (PyTorch's defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Option<Tensor>,
    v: Option<Tensor>,
}

/// AdamW: p ← p·(1 - lr·wd); m, v moving averages of g and g²; p ← p - lr·m̂/(√v̂ + ε).
#[derive(Debug)]
pub struct AdamW {
    slots: Vec<Slot>,
    cfg: AdamWConfig,
    step: u64,
}

impl AdamW {
    /// An optimizer that decays the parameters in `decay` and not those in `no_decay`.
    pub fn with_groups(decay: Vec<(String, Var)>, no_decay: Vec<(String, Var)>, cfg: AdamWConfig) -> Self {
        let slot = |decay| {
            move |(name, var)| Slot {
                name,
                var,
                decay,
                m: None,
                v: None,
            }
        };
        let slots = decay
            .into_iter()
            .map(slot(true))
            .chain(no_decay.into_iter().map(slot(false)))
            .collect();
        AdamW { slots, cfg, step: 0 }
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let (bc1, bc2) = (
            1.0 - c.beta1.powi(self.step as i32),
            1.0 - c.beta2.powi(self.step as i32),
        );
        for s in self.slots.iter_mut() {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let mut p = s.var.as_tensor().clone();
            if s.decay && c.weight_decay != 0.0 {
                p = (p * (1.0 - c.lr * c.weight_decay))?;
            }
            let m = match &s.m {
                Some(m) => ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?,
                None => (g * (1.0 - c.beta1))?,
            };
            let v = match &s.v {
                Some(v) => ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?,
                None => (g.sqr()? * (1.0 - c.beta2))?,
            };
            let upd = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            s.var.set(&(p - (upd * c.lr)?)?)?;
            s.m = Some(m.detach());
            s.v = Some(v.detach());
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
        let mut st = OptimState {
            step: self.step,
            ..Default::default()
        };
        for s in &self.slots {
            if let (Some(m), Some(v)) = (&s.m, &s.v) {
                st.tensors.insert(format!("exp_avg.{}", s.name), m.clone());
                st.tensors.insert(format!("exp_avg_sq.{}", s.name), v.clone());
            }
        }
        st
    }
    fn load_state(&mut self, st: &OptimState) -> Result<()> {
        self.step = st.step;
        for s in self.slots.iter_mut() {
            let get = |k: &str| -> Result<Option<Tensor>> {
                match st.tensors.get(&format!("{k}.{}", s.name)) {
                    Some(t) if t.dims() != s.var.dims() => {
                        candle_core::bail!("adamw: state {k} of {} has shape {:?}", s.name, t.dims())
                    }
                    Some(t) => Ok(Some(t.to_dtype(s.var.dtype())?)),
                    None => Ok(None),
                }
            };
            s.m = get("exp_avg")?;
            s.v = get("exp_avg_sq")?;
        }
        Ok(())
    }
}
