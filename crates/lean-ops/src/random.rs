//! Reproducible randomness inside models (dropout).
//!
//! candle's CPU random tensors come from a thread-local generator that cannot be seeded, so a
//! training run with dropout could not be repeated or resumed exactly. Dropout here draws its
//! masks from a process-wide seeded stream instead: [`reseed`] it (the trainer does at the start
//! of every epoch) and every later mask is a function of that seed and the call order.

use crate::error::{config_err, Result};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering};

static STREAM: AtomicU64 = AtomicU64::new(0x853c_49e6_748f_ea9b);

/// Restarts the stream of dropout masks from `seed`.
pub fn reseed(seed: u64) {
    STREAM.store(seed, Ordering::SeqCst);
}

fn next_seed() -> u64 {
    // SplitMix64 step: distinct, well-mixed seeds for successive calls.
    let s = STREAM
        .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::SeqCst)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    let z = (s ^ (s >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Inverted dropout: zeroes each value with probability `p` and scales the rest by 1/(1-p).
pub fn dropout(x: &Tensor, p: f64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        return Err(config_err("dropout", format!("p must be in [0, 1), got {p}")));
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(next_seed());
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep as f32 })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}
