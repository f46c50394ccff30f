//! SGD with momentum, dampening, Nesterov and weight decay, as `torch.optim.SGD`.

use crate::optim::{OptimState, Optimizer as LeanOptimizer};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

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

/// One parameter and its state.
#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    decay: bool,
    momentum_buffer: Option<Tensor>,
}

/// Stochastic gradient descent with PyTorch's update rule:
/// d = g + wd·p; b = μ·b + (1 - τ)·d (b = d on the first step); d = d + μ·b (Nesterov) or b;
/// p = p - lr·d.
#[derive(Debug)]
pub struct Sgd {
    slots: Vec<Slot>,
    cfg: SgdConfig,
}

impl Sgd {
    /// An optimizer that decays the parameters in `decay` and not those in `no_decay`.
    pub fn with_groups(decay: Vec<(String, Var)>, no_decay: Vec<(String, Var)>, cfg: SgdConfig) -> Result<Self> {
        if cfg.nesterov && (cfg.momentum <= 0.0 || cfg.dampening != 0.0) {
            candle_core::bail!("sgd: Nesterov momentum requires momentum > 0 and dampening 0, got {cfg:?}");
        }
        let slot = |decay| {
            move |(name, var)| Slot {
                name,
                var,
                decay,
                momentum_buffer: None,
            }
        };
        let slots = decay
            .into_iter()
            .map(slot(true))
            .chain(no_decay.into_iter().map(slot(false)))
            .collect();
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
        for s in self.slots.iter_mut() {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let p = s.var.as_tensor();
            let mut d = if s.decay && c.weight_decay != 0.0 {
                (g + (p * c.weight_decay)?)?
            } else {
                g.clone()
            };
            if c.momentum != 0.0 {
                let buf = match &s.momentum_buffer {
                    None => d.clone(),
                    Some(b) => ((b * c.momentum)? + (&d * (1.0 - c.dampening))?)?,
                };
                d = if c.nesterov {
                    (d + (&buf * c.momentum)?)?
                } else {
                    buf.clone()
                };
                s.momentum_buffer = Some(buf.detach());
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
        for s in &self.slots {
            if let Some(b) = &s.momentum_buffer {
                st.tensors.insert(format!("momentum_buffer.{}", s.name), b.clone());
            }
        }
        st
    }
    fn load_state(&mut self, st: &OptimState) -> Result<()> {
        for s in self.slots.iter_mut() {
            s.momentum_buffer = match st.tensors.get(&format!("momentum_buffer.{}", s.name)) {
                Some(b) if b.dims() != s.var.dims() => {
                    candle_core::bail!(
                        "sgd: momentum buffer of {} has shape {:?}, the parameter {:?}",
                        s.name,
                        b.dims(),
                        s.var.dims()
                    )
                }
                Some(b) => Some(b.to_dtype(s.var.dtype())?),
                None => None,
            };
        }
        Ok(())
    }
}
