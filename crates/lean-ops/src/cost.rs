//! Parameter and multiply-accumulate accounting.
//!
//! Convention (the one behind torchvision's published GFLOPS, e.g. resnet18 = 1.814 G): only
//! convolutions and linear layers count MACs; normalisation, activations, pooling and additions
//! count none. MACs are for the whole input shape given, batch included: pass N = 1 for
//! per-image figures.

use std::ops::{Add, AddAssign};

/// Parameters and MACs of an operator (or a sum of them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// Number of trainable parameters.
    pub params: u64,
    /// Multiply-accumulates for one forward pass over the given input shape.
    pub macs: u64,
}

impl Cost {
    /// A cost with the given parameters and MACs.
    pub fn new(params: u64, macs: u64) -> Self {
        Cost { params, macs }
    }
}

impl Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost {
            params: self.params + o.params,
            macs: self.macs + o.macs,
        }
    }
}

impl AddAssign for Cost {
    fn add_assign(&mut self, o: Cost) {
        *self = *self + o;
    }
}

impl std::iter::Sum for Cost {
    fn sum<I: Iterator<Item = Cost>>(iter: I) -> Cost {
        iter.fold(Cost::default(), |a, b| a + b)
    }
}

/// Something whose cost can be computed from its input shape alone.
pub trait CostModel {
    /// The cost of one forward pass over an input of shape `input`, and the output shape.
    fn cost(&self, input: &[usize]) -> crate::Result<(Cost, Vec<usize>)>;
}

/// The cost of a linear layer `in_features -> out_features` over an input (.., in_features).
pub fn linear_cost(
    in_features: usize,
    out_features: usize,
    bias: bool,
    input: &[usize],
) -> crate::Result<(Cost, Vec<usize>)> {
    match input.last() {
        Some(&f) if f == in_features => {
            let rows: usize = input[..input.len() - 1].iter().product();
            let params = in_features * out_features + if bias { out_features } else { 0 };
            let mut out = input.to_vec();
            *out.last_mut().expect("non-empty") = out_features;
            Ok((
                Cost::new(params as u64, (rows * in_features * out_features) as u64),
                out,
            ))
        }
        _ => Err(crate::error::shape_err(
            "linear",
            format!("expected input (.., {in_features}), got {input:?}"),
        )),
    }
}
