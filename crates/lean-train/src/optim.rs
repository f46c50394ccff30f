//! The optimizer interface: a step from gradients, a settable learning rate, and state that a
//! checkpoint can save and restore exactly.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};
use std::collections::HashMap;

/// Saveable optimizer state: named tensors plus a step counter.
#[derive(Debug, Default, Clone)]
pub struct OptimState {
    /// Per-parameter state tensors, named `<kind>.<parameter>`.
    pub tensors: HashMap<String, Tensor>,
    /// Steps taken (AdamW's bias correction).
    pub step: u64,
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
