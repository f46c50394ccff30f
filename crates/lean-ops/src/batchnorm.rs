//! BatchNorm2d with PyTorch semantics (running statistics as `Var`s, momentum, eps), fused with
//! ReLU / ReLU6, in NCHW or channels-last; the ops it runs live in norm.rs.

use crate::activation::Activation;
use crate::channels_last::ChannelMoments;
use crate::cost::{Cost, CostModel};
use crate::cpu_op::OnCpu;
use crate::error::{check_float, config_err, dims4, shape_err, Result};
use crate::kernels::rows;
use crate::norm::{batch_stats, channel_affine_layout, channel_dims, BnAddActOp, BnTrainOp};
use crate::real::{dispatch_dtype, with_data};
use candle_core::{DType, ModuleT, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use std::sync::Mutex;

/// Settings of a [`BatchNorm2d`] (PyTorch's defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormConfig {
    /// Added to the variance before the square root.
    pub eps: f64,
    /// Weight of the new batch statistic in the running averages.
    pub momentum: f64,
    /// Whether the layer has a learned `weight` and `bias`.
    pub affine: bool,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        BatchNormConfig {
            eps: 1e-5,
            momentum: 0.1,
            affine: true,
        }
    }
}

/// BatchNorm over the channels of (N, C, H, W) with PyTorch semantics: train mode normalises
/// with the biased batch variance and updates `running_mean` / `running_var` (unbiased) with
/// momentum and counts `num_batches_tracked`; eval mode uses the running statistics.
/// Tensors are named as torchvision's: `weight`, `bias`, `running_mean`, `running_var`,
/// `num_batches_tracked`.
#[derive(Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    num_batches_tracked: Mutex<Var>,
    cfg: BatchNormConfig,
    num_features: usize,
}

impl BatchNorm2d {
    /// Builds the layer from `vb` (new layers: weight 1, bias 0, running mean 0, var 1).
    pub fn new(num_features: usize, cfg: BatchNormConfig, vb: VarBuilder) -> Result<Self> {
        let c = num_features;
        let (weight, bias) = if cfg.affine {
            (
                vb.get_with_hints(c, "weight", Init::Const(1.))?,
                vb.get_with_hints(c, "bias", Init::Const(0.))?,
            )
        } else {
            (
                Tensor::ones(c, vb.dtype(), vb.device())?,
                Tensor::zeros(c, vb.dtype(), vb.device())?,
            )
        };
        let running_mean = Var::from_tensor(&vb.get_with_hints(c, "running_mean", Init::Const(0.))?)?;
        let running_var = Var::from_tensor(&vb.get_with_hints(c, "running_var", Init::Const(1.))?)?;
        // torchvision state dicts carry an I64 scalar; files without it start counting at 0.
        let nbt = match vb.get_with_hints_dtype((), "num_batches_tracked", Init::Const(0.), DType::I64) {
            Ok(t) => t,
            Err(_) if !vb.contains_tensor("num_batches_tracked") => Tensor::zeros((), DType::I64, vb.device())?,
            Err(e) => return Err(e.into()),
        };
        let num_batches_tracked = Mutex::new(Var::from_tensor(&nbt)?);
        Ok(BatchNorm2d {
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked,
            cfg,
            num_features,
        })
    }

    /// Number of channels.
    pub fn num_features(&self) -> usize {
        self.num_features
    }
    /// The configuration.
    pub fn config(&self) -> &BatchNormConfig {
        &self.cfg
    }
    /// The scale γ.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// The shift β.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
    /// The running mean.
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }
    /// The running (unbiased) variance.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }
    /// How many train-mode batches updated the running statistics.
    pub fn num_batches_tracked(&self) -> Result<i64> {
        let v = self
            .num_batches_tracked
            .lock()
            .map_err(|_| shape_err("batch_norm", "poisoned counter"))?;
        Ok(v.as_tensor().to_dtype(DType::I64)?.to_scalar::<i64>()?)
    }

    /// The eval-mode map as per-channel (scale, shift): y = x · scale + shift. Used to fold the
    /// BatchNorm into the preceding convolution for inference. The running statistics enter as
    /// constants (buffers, never differentiated): the map tracks gradients only through γ and β.
    pub fn eval_scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let invstd = (self.running_var.as_tensor().detach() + self.cfg.eps)?
            .sqrt()?
            .recip()?;
        let scale = (&self.weight * invstd)?;
        let shift = (&self.bias - (self.running_mean.as_tensor().detach() * &scale)?)?;
        Ok((scale, shift))
    }

    /// BatchNorm followed by `act`, in train (batch statistics, running stats updated) or eval
    /// mode.
    pub fn forward_act(&self, x: &Tensor, train: bool, act: Activation) -> Result<Tensor> {
        let (_, c, _, _) = dims4("batch_norm", x)?;
        self.forward_layout(x, c, train, act, false, None, None)
    }

    /// [`forward_act`](Self::forward_act) on a channels-last (N, H, W, C) input
    /// ([`crate::channels_last`]); the output is channels-last too.
    pub fn forward_act_nhwc(&self, x: &Tensor, train: bool, act: Activation) -> Result<Tensor> {
        self.forward_nhwc_with(x, train, act, None, None)
    }

    /// act(BatchNorm(x) + residual) on channels-last (N, H, W, C) tensors of one shape: the end
    /// of a residual block. Training on the CPU runs it as one op: one pass forward, and a
    /// backward that writes the residual's gradient in the pass that sums the statistics'
    /// gradients (BatchNorm, then the add and activation, would each make passes of their own
    /// and keep BatchNorm's output alive). The values are the composite's, bit for bit.
    pub fn forward_add_act_nhwc(&self, x: &Tensor, train: bool, residual: &Tensor, act: Activation) -> Result<Tensor> {
        self.forward_nhwc_with(x, train, act, Some(residual), None)
    }

    /// The shift for a convolution that sums this layer's batch statistics in its own output
    /// pass (`channels_last::*_moments`): the running mean, near the batch mean.
    pub fn moments_shift(&self) -> Result<Vec<f64>> {
        Ok(self.running_mean.as_tensor().to_dtype(DType::F64)?.to_vec1()?)
    }

    /// The channels-last forward in full: act(BatchNorm(x) [+ residual]), in training with the
    /// batch's `moments` when the convolution before took them
    /// ([`crate::channels_last::lean_conv2d_nhwc_moments`]); without, this layer sums them.
    pub fn forward_nhwc_with(
        &self,
        x: &Tensor,
        train: bool,
        act: Activation,
        residual: Option<&Tensor>,
        moments: Option<ChannelMoments>,
    ) -> Result<Tensor> {
        let c = match x.dims() {
            &[_, _, _, c] => c,
            d => {
                return Err(shape_err(
                    "batch_norm",
                    format!("expected a rank-4 channels-last (N, H, W, C) input, got shape {d:?}"),
                ))
            }
        };
        if let Some(m) = moments.as_ref().filter(|m| m.mean.len() != c || m.var.len() != c) {
            return Err(shape_err(
                "batch_norm",
                format!(
                    "moments for {} / {} channels given, the input has {c} (shape {:?})",
                    m.mean.len(),
                    m.var.len(),
                    x.dims()
                ),
            ));
        }
        let residual_mismatch = residual.filter(|r| r.dims() != x.dims() || r.dtype() != x.dtype());
        if let Some(residual) = residual_mismatch {
            return Err(shape_err(
                "batch_norm",
                format!(
                    "the residual must match the input: input {:?} {:?}, residual {:?} {:?}",
                    x.dims(),
                    x.dtype(),
                    residual.dims(),
                    residual.dtype()
                ),
            ));
        }
        self.forward_layout(x, c, train, act, true, residual, moments)
    }

    /// act(BatchNorm(x) [+ residual]) over NCHW planes or channels-last rows (`last`), with the
    /// batch's moments where given (checked against `c`).
    #[allow(clippy::too_many_arguments)]
    fn forward_layout(
        &self,
        x: &Tensor,
        c: usize,
        train: bool,
        act: Activation,
        last: bool,
        residual: Option<&Tensor>,
        moments: Option<ChannelMoments>,
    ) -> Result<Tensor> {
        const OP: &str = "batch_norm";
        // Without the fused op, BatchNorm runs alone and the add + activation after it.
        let (inner_act, add_act) = match residual {
            Some(r) => (Activation::None, Some((r, act))),
            None => (act, None),
        };
        let finish = |y: Tensor| -> Result<Tensor> {
            match add_act {
                Some((r, act)) => crate::activation::add_activation(&y, r, act),
                None => Ok(y),
            }
        };
        if c != self.num_features {
            return Err(shape_err(
                OP,
                format!(
                    "input has {c} channels, the layer expects {} (input shape {:?})",
                    self.num_features,
                    x.dims()
                ),
            ));
        }
        if !train {
            let (scale, shift) = self.eval_scale_shift()?;
            return finish(channel_affine_layout(x, &scale, &shift, inner_act, last)?);
        }
        check_float(OP, x)?;
        let mut m = x.elem_count() / c;
        if m < 2 {
            return Err(shape_err(
                OP,
                format!(
                    "expected more than 1 value per channel when training, got input shape {:?}",
                    x.dims()
                ),
            ));
        }
        // SyncBN (lean_ops::dist): the group this thread's BatchNorms normalise over, if any.
        let sync = crate::dist::sync_group().filter(|g| g.world_size() > 1);
        let (y, mean, var) = if x.device().is_cpu() {
            let (_, hw) = channel_dims(x.dims(), last);
            let x = x.contiguous()?;
            let stats = || -> candle_core::Result<_> {
                dispatch_dtype!(OP, x.dtype(), |T| with_data::<T, _>(&x, |xs| Ok(if last {
                    rows::moments(xs, c)
                } else {
                    batch_stats(c, hw, xs)
                })))
            };
            let (mean, var) = match moments {
                Some(m) => (m.mean, m.var),
                None => stats()?,
            };
            let (mean, var, count) = match &sync {
                Some(g) => crate::dist::combine_moments(g.as_ref(), &mean, &var, m)?,
                None => (mean, var, m),
            };
            m = count;
            let invstd = var.iter().map(|v| 1.0 / (v + self.cfg.eps).sqrt()).collect();
            let mut op = BnTrainOp {
                mean: mean.clone(),
                invstd,
                act: inner_act,
                last,
                sync: sync.map(|g| (g, count)),
            };
            let y = match add_act {
                Some((r, act)) if last => {
                    op.act = act;
                    // One op of three inputs: the weight and bias travel as one (2C) tensor.
                    let wb = Tensor::cat(&[&self.weight, &self.bias], 0)?;
                    x.apply_op3(&wb, &r.contiguous()?, OnCpu(BnAddActOp(op)))?
                }
                _ => finish(x.apply_op3(&self.weight.contiguous()?, &self.bias.contiguous()?, OnCpu(op))?)?,
            };
            let dev = x.device();
            (y, Tensor::new(mean, dev)?, Tensor::new(var, dev)?)
        } else {
            let nchw = if last {
                crate::channels_last::to_channels_first(x)?
            } else {
                x.clone()
            };
            let (y, mean, var, count) =
                device_batch_norm_train(&nchw, &self.weight, &self.bias, self.cfg.eps, inner_act, sync)?;
            m = count;
            let y = if last {
                crate::channels_last::to_channels_last(&y)?
            } else {
                y
            };
            (
                finish(y)?,
                mean.detach().to_dtype(DType::F64)?,
                var.detach().to_dtype(DType::F64)?,
            )
        };
        self.update_running(&mean, &var, m)?;
        Ok(y)
    }

    fn update_running(&self, mean: &Tensor, var: &Tensor, m: usize) -> Result<()> {
        let mo = self.cfg.momentum;
        let dt = self.running_mean.dtype();
        let unbiased = (var * (m as f64 / (m as f64 - 1.0)))?;
        let rm = ((self.running_mean.as_tensor().to_dtype(DType::F64)? * (1.0 - mo))? + (mean * mo)?)?;
        let rv = ((self.running_var.as_tensor().to_dtype(DType::F64)? * (1.0 - mo))? + (unbiased * mo)?)?;
        self.running_mean.set(&rm.to_dtype(dt)?)?;
        self.running_var.set(&rv.to_dtype(dt)?)?;
        let nbt = self
            .num_batches_tracked
            .lock()
            .map_err(|_| shape_err("batch_norm", "poisoned counter"))?;
        let next = (nbt.as_tensor().to_dtype(DType::F64)? + 1.0)?.to_dtype(nbt.dtype())?;
        nbt.set(&next)?;
        Ok(())
    }
}

/// Train-mode BatchNorm + activation of an NCHW tensor on a non-CPU device, synchronised over
/// `sync` if given: our CUDA kernels where built in, else the composite (which cannot
/// synchronise). Returns (y, mean, var, values per channel the statistics span).
fn device_batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    act: Activation,
    sync: Option<std::sync::Arc<dyn crate::dist::Collective>>,
) -> Result<(Tensor, Tensor, Tensor, usize)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::F64) {
        return crate::cuda::norm::batch_norm_train(x, weight, bias, eps, act, sync);
    }
    if sync.is_some() {
        return Err(config_err(
            "batch_norm",
            format!(
                "synchronised BatchNorm runs on the CPU and, with the cuda feature, on CUDA; this input is on {:?}",
                x.device().location()
            ),
        ));
    }
    let (y, mean, var) = crate::reference::batch_norm_train(x, weight, bias, eps, act)?;
    let count = x.elem_count() / x.dim(1)?.max(1);
    Ok((y, mean, var, count))
}

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Ok(self.forward_act(x, train, Activation::None)?)
    }
}

impl CostModel for BatchNorm2d {
    fn cost(&self, input: &[usize]) -> Result<(Cost, Vec<usize>)> {
        let params = if self.cfg.affine { 2 * self.num_features } else { 0 };
        Ok((Cost::new(params as u64, 0), input.to_vec()))
    }
}
