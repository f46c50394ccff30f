//! Reproducible weight initialisation: a `VarBuilder` backend over a `VarMap` whose new
//! variables are drawn from a generator seeded by (seed, variable name). candle's own CPU
//! initialisers use an unseedable thread-local generator.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal, Uniform};

/// A `VarMap` that creates missing variables deterministically.
struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

/// A stable 64-bit hash of a name (FNV-1a).
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A tensor drawn from `init` with a generator seeded by `seed`.
pub fn init_tensor(shape: &Shape, init: &Init, seed: u64, dtype: DType, dev: &Device) -> Result<Tensor> {
    let n = shape.elem_count();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = |rng: &mut rand::rngs::StdRng, mean: f64, std: f64| -> Vec<f64> {
        (0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(rng);
                mean + std * z
            })
            .collect::<Vec<f64>>()
    };
    let v: Vec<f64> = match *init {
        Init::Const(c) => vec![c; n],
        Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
        Init::Uniform { lo, up } => {
            let u = Uniform::new(lo, up).map_err(|e| candle_core::Error::Msg(format!("uniform init: {e}")))?;
            (0..n).map(|_| u.sample(&mut rng)).collect()
        }
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = match fan {
                FanInOut::FanIn | FanInOut::FanOut => fan.for_shape(shape),
            };
            let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
                NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    let u = Uniform::new(-b, b).map_err(|e| candle_core::Error::Msg(format!("kaiming init: {e}")))?;
                    (0..n).map(|_| u.sample(&mut rng)).collect()
                }
            }
        }
    };
    Tensor::from_vec(v, shape.clone(), dev)?.to_dtype(dtype)
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("varmap lock poisoned".into()))?;
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!(
                    "shape mismatch for {name}: stored {:?}, expected {:?}",
                    v.dims(),
                    s.dims()
                );
            }
            return Ok(v.as_tensor().clone());
        }
        let t = init_tensor(&s, &h, self.seed ^ name_hash(name), dtype, dev)?;
        let v = Var::from_tensor(&t)?;
        data.insert(name.to_string(), v.clone());
        Ok(v.as_tensor().clone())
    }
    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("varmap lock poisoned".into()))?;
        data.get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().map(|d| d.contains_key(name)).unwrap_or(false)
    }
}

/// A `VarBuilder` that stores its variables in `varmap`, new ones drawn reproducibly from `seed`.
pub fn seeded_var_builder(varmap: &VarMap, seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededVarMap {
            varmap: varmap.clone(),
            seed,
        }),
        dtype,
        device.clone(),
    )
}
