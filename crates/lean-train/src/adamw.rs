//! AdamW (decoupled weight decay), as `torch.optim.AdamW`, with saveable state.

use crate::optim::{OptimState, Optimizer, Param};
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

/// The moving averages of one parameter (none before its first step).
#[derive(Debug, Default)]
struct Moments {
    m: Option<Tensor>,
    v: Option<Tensor>,
}

/// AdamW: p ← p·(1 - lr·wd); m, v moving averages of g and g²; p ← p - lr·m̂/(√v̂ + ε).
#[derive(Debug)]
pub struct AdamW {
    slots: Vec<(Param, Moments)>,
    cfg: AdamWConfig,
    step: u64,
}

impl AdamW {
    /// An optimizer that decays the parameters in `decay` and not those in `no_decay`.
    pub fn with_groups(decay: Vec<(String, Var)>, no_decay: Vec<(String, Var)>, cfg: AdamWConfig) -> Self {
        let slots = Param::slots(decay, no_decay);
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
        for (s, mo) in self.slots.iter_mut() {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let mut p = s.var.as_tensor().clone();
            if s.decay && c.weight_decay != 0.0 {
                p = (p * (1.0 - c.lr * c.weight_decay))?;
            }
            let m = match &mo.m {
                Some(m) => ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?,
                None => (g * (1.0 - c.beta1))?,
            };
            let v = match &mo.v {
                Some(v) => ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?,
                None => (g.sqr()? * (1.0 - c.beta2))?,
            };
            let upd = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            s.var.set(&(p - (upd * c.lr)?)?)?;
            mo.m = Some(m.detach());
            mo.v = Some(v.detach());
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
        for (s, mo) in &self.slots {
            if mo.m.is_some() && mo.v.is_some() {
                s.save(&mut st, "exp_avg", mo.m.as_ref());
                s.save(&mut st, "exp_avg_sq", mo.v.as_ref());
            }
        }
        st
    }
    fn load_state(&mut self, st: &OptimState) -> Result<()> {
        self.step = st.step;
        for (s, mo) in self.slots.iter_mut() {
            mo.m = s.load("adamw", st, "exp_avg")?;
            mo.v = s.load("adamw", st, "exp_avg_sq")?;
        }
        Ok(())
    }
}
