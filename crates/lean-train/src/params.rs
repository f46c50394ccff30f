//! Splitting a model's variables into parameters with and without weight decay, and buffers.

use candle_core::Var;
use candle_nn::VarMap;

/// A model's variables by role, each sorted by name.
#[derive(Debug, Default)]
pub struct ParamGroups {
    /// Parameters that get weight decay.
    pub decay: Vec<(String, Var)>,
    /// Parameters that do not (BatchNorm weights and biases, all biases: timm's habit).
    pub no_decay: Vec<(String, Var)>,
    /// State that is saved but not trained (BatchNorm running statistics and counters).
    pub buffers: Vec<(String, Var)>,
}

/// Whether a variable name is a BatchNorm buffer rather than a parameter.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var") || name.ends_with("num_batches_tracked")
}

impl ParamGroups {
    /// Sorts the variables of `vm`. With `decay_all`, every parameter is decayed (PyTorch's
    /// default); otherwise parameters of rank <= 1 (biases, BatchNorm scales) are not.
    pub fn from_varmap(vm: &VarMap, decay_all: bool) -> Self {
        let mut all: Vec<(String, Var)> = vm
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let mut g = ParamGroups::default();
        for (name, var) in all {
            if is_buffer(&name) {
                g.buffers.push((name, var));
            } else if decay_all || var.rank() > 1 {
                g.decay.push((name, var));
            } else {
                g.no_decay.push((name, var));
            }
        }
        g
    }

    /// Moves the decayed parameters whose name satisfies `exempt` to the group without decay
    /// (e.g. the small stencil weights of lean convolutions, `*.stencil.weight`).
    pub fn exempt_from_decay(mut self, exempt: impl Fn(&str) -> bool) -> Self {
        let (moved, kept): (Vec<_>, Vec<_>) = self.decay.into_iter().partition(|(n, _)| exempt(n));
        self.decay = kept;
        self.no_decay.extend(moved);
        self.no_decay.sort_by(|a, b| a.0.cmp(&b.0));
        self
    }

    /// Every trained parameter.
    pub fn params(&self) -> impl Iterator<Item = &(String, Var)> {
        self.decay.iter().chain(&self.no_decay)
    }
}
