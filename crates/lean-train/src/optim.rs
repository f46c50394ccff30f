//! The optimizer interface: a step from gradients, a settable learning rate, and state that a
//! checkpoint can save and restore exactly.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use std::collections::HashMap;

/// Saveable optimizer state: named tensors plus a step counter.
#[derive(Debug, Default, Clone)]
pub struct OptimState {
    /// Per-parameter state tensors, named `<kind>.<parameter>`.
    pub tensors: HashMap<String, Tensor>,
    /// Steps taken (AdamW's bias correction).
    pub step: u64,
}

/// One parameter of an optimizer: its name (which keys its saved state), its variable, and
/// whether weight decay applies to it.
#[derive(Debug)]
pub(crate) struct Param {
    pub(crate) name: String,
    pub(crate) var: Var,
    pub(crate) decay: bool,
}

impl Param {
    /// The parameters of `decay` (decayed) then `no_decay`, each with a fresh state `S`.
    pub(crate) fn slots<S: Default>(decay: Vec<(String, Var)>, no_decay: Vec<(String, Var)>) -> Vec<(Param, S)> {
        let tag = |decay| move |(name, var)| (Param { name, var, decay }, S::default());
        decay
            .into_iter()
            .map(tag(true))
            .chain(no_decay.into_iter().map(tag(false)))
            .collect()
    }

    /// Stores state tensor `kind` of this parameter (as `<kind>.<name>`), if it has one.
    pub(crate) fn save(&self, st: &mut OptimState, kind: &str, t: Option<&Tensor>) {
        // A copy: the CPU update runs in place, a snapshot must not follow it. (Copying a CPU
        // tensor cannot fail short of an allocation abort; on other devices the state is
        // replaced, not mutated, so sharing it is as good as a copy.)
        if let Some(t) = t {
            let snapshot = t.copy().unwrap_or_else(|_| t.clone());
            st.tensors.insert(format!("{kind}.{}", self.name), snapshot);
        }
    }

    /// Reads state tensor `kind` of this parameter back (in its dtype); a shape that differs
    /// from the parameter's is an error naming optimizer, state, parameter and both shapes.
    pub(crate) fn load(&self, opt: &str, st: &OptimState, kind: &str) -> Result<Option<Tensor>> {
        match st.tensors.get(&format!("{kind}.{}", self.name)) {
            Some(t) if t.dims() != self.var.dims() => candle_core::bail!(
                "{opt}: state {kind} of {} has shape {:?}, the parameter {:?}",
                self.name,
                t.dims(),
                self.var.dims()
            ),
            // Own storage (`to_dtype` of the same dtype shares it): the state is updated in place.
            Some(t) => Ok(Some(t.to_dtype(self.var.dtype())?.copy()?)),
            None => Ok(None),
        }
    }
}

/// What the training loop needs of an optimizer.
pub trait Optimizer: Send {
    /// Applies one update from `grads`.
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    /// The current learning rate.
    fn learning_rate(&self) -> f64;
    /// Sets the learning rate (schedules call this).
    fn set_learning_rate(&mut self, lr: f64);
    /// The state to checkpoint.
    fn state(&self) -> OptimState;
    /// Restores a checkpointed state.
    fn load_state(&mut self, st: &OptimState) -> Result<()>;
}

/// Scales all gradients so that their global L2 norm is at most `max_norm`; returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, params: &[&candle_core::Var], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for p in params {
        if let Some(g) = grads.get(p.as_tensor()) {
            sq += g
                .to_dtype(candle_core::DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    if norm > max_norm && norm > 0.0 {
        let k = max_norm / (norm + 1e-6);
        for p in params {
            if let Some(g) = grads.remove(p.as_tensor()) {
                grads.insert(p.as_tensor(), (g * k)?);
            }
        }
    }
    Ok(norm)
}
