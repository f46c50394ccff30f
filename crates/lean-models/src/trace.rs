//! The per-layer trace behind `lean info` and the cost of every model: each layer reports its
//! output shape, parameters and MACs from an input shape alone.

use lean_ops::Cost;

/// One row of a model's per-layer table.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerRow {
    /// The layer's parameter prefix, e.g. `layer1.0.conv1`.
    pub name: String,
    /// What it is, e.g. `conv3x3`, `lean3x3`, `dw3x3`, `bn`, `linear`.
    pub kind: String,
    /// Output shape.
    pub out_shape: Vec<usize>,
    /// Its parameters and MACs.
    pub cost: Cost,
}

/// Collects [`LayerRow`]s while walking a model with an input shape.
#[derive(Default, Debug)]
pub struct Trace {
    /// The rows so far, in execution order.
    pub rows: Vec<LayerRow>,
}

impl Trace {
    pub(crate) fn push(&mut self, name: &str, kind: &str, cost: Cost, out: Vec<usize>) -> Vec<usize> {
        self.rows.push(LayerRow {
            name: name.to_string(),
            kind: kind.to_string(),
            out_shape: out.clone(),
            cost,
        });
        out
    }
    /// The sum over all rows.
    pub fn total(&self) -> Cost {
        self.rows.iter().map(|r| r.cost).sum()
    }
}
