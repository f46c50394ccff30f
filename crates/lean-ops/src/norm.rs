//! BatchNorm2d with PyTorch semantics, fused with ReLU / ReLU6, and the channel-wise affine op
//! behind eval-mode BatchNorm and standalone activations.

use crate::cost::{Cost, CostModel};
use crate::error::{check_float, check_same_float, dims4, shape_err, Result};
use crate::isa::isa_dispatch;
use crate::kernels::rows;
use crate::real::{dispatch, dispatch_dtype, slice, tensor, with_data, Real};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, ModuleT, Shape, Tensor, Var, WithDType};
use candle_nn::{Init, VarBuilder};
use num_traits::Zero;
use rayon::prelude::*;
use std::sync::Mutex;

/// An activation fused into the preceding op.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activation {
    /// The identity.
    #[default]
    None,
    /// max(x, 0).
    Relu,
    /// min(max(x, 0), 6) (MobileNetV2).
    Relu6,
}

#[inline]
fn relu<T: Real>(v: T) -> T {
    if v > T::zero() {
        v
    } else {
        T::zero()
    }
}

#[inline]
fn relu6<T: Real>(v: T) -> T {
    let six = T::from_f64(6.0);
    if v > T::zero() {
        if v < six {
            v
        } else {
            six
        }
    } else {
        T::zero()
    }
}

/// Runs `body` with the activation as a plain function, so that each activation gets its own
/// branch-free, vectorised loop (a match per element defeats vectorisation).
macro_rules! with_act {
    ($act:expr, |$f:ident| $body:expr) => {
        match $act {
            Activation::None => {
                let $f = |v| v;
                $body
            }
            Activation::Relu => {
                let $f = relu;
                $body
            }
            Activation::Relu6 => {
                let $f = relu6;
                $body
            }
        }
    };
}

impl Activation {
    /// The activation from candle primitives (reference path).
    pub fn apply_tensor(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::None => x.clone(),
            Activation::Relu => x.relu()?,
            Activation::Relu6 => x.clamp(0f32, 6f32)?,
        })
    }
}

/// Per-channel affine map and activation: y = act(x · scale[c] + shift[c]), over NCHW planes
/// or, with `last`, over channels-last rows.
struct ChannelAffineOp {
    act: Activation,
    last: bool,
}

/// (channels, values per plane): NCHW planes, or channels-last rows (plane size 1).
fn channel_dims(d: &[usize], last: bool) -> (usize, usize) {
    if last {
        (d[d.len() - 1], 1)
    } else {
        (d[1], d[2..].iter().product())
    }
}

/// y = act(x · scale[c] + shift[c]) over NCHW planes of `hw` values or channels-last rows.
fn affine_act<T: Real>(x: &[T], scale: &[T], shift: &[T], hw: usize, act: Activation, last: bool) -> Vec<T> {
    if last {
        with_act!(act, |f| rows::affine_map(x, scale, shift, f))
    } else {
        affine_act_planes(x, scale, shift, hw, act)
    }
}

/// y = act(x · scale[c] + shift[c]) over the (N·C) planes of `hw` values.
fn affine_act_planes<T: Real>(x: &[T], scale: &[T], shift: &[T], hw: usize, act: Activation) -> Vec<T> {
    let c = scale.len();
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(p, (yp, xp))| {
            let (a, b) = (scale[p % c], shift[p % c]);
            isa_dispatch!(affine_act_plane(yp, xp, a, b, act));
        });
    y
}

/// y = act(x · a + b) over one plane.
#[inline(always)]
fn affine_act_plane<T: Real>(y: &mut [T], x: &[T], a: T, b: T, act: Activation) {
    with_act!(act, |f| y.iter_mut().zip(x).for_each(|(yv, xv)| *yv = f(*xv * a + b)));
}

/// y = x · a over one plane.
#[inline(always)]
fn scale_plane<T: Real>(y: &mut [T], x: &[T], a: T) {
    y.iter_mut().zip(x).for_each(|(o, v)| *o = *v * a);
}

/// Elements per parallel task of the elementwise maps: large enough that rayon's per-task cost
/// vanishes, small enough to share a layer's tensor between the cores.
const MAP_CHUNK: usize = 1 << 14;

/// out[i] = f(a[i], b[i]) in parallel over fixed chunks; the plain inner loop vectorises
/// (a rayon map per element does not).
fn par_map2<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); a.len()];
    out.par_chunks_mut(MAP_CHUNK)
        .zip(a.par_chunks(MAP_CHUNK).zip(b.par_chunks(MAP_CHUNK)))
        .for_each(|(o, (a, b))| isa_dispatch!(map2_chunk(o, a, b, &f)));
    out
}

#[inline(always)]
fn map2_chunk<T: Real>(out: &mut [T], a: &[T], b: &[T], f: &impl Fn(T, T) -> T) {
    for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
        *o = f(*a, *b);
    }
}

/// gy · act'(y): the gradient before the activation, read off the activation's output.
fn pre_activation_grad<T: Real>(gy: &[T], y: &[T], act: Activation) -> Vec<T> {
    // One branch-free loop per activation (a select vectorises; a match per element does not).
    let (zero, six) = (T::zero(), T::from_f64(6.0));
    match act {
        Activation::None => gy.to_vec(),
        Activation::Relu => par_map2(gy, y, |g, y| if y > zero { g } else { zero }),
        Activation::Relu6 => par_map2(gy, y, |g, y| if y > zero && y < six { g } else { zero }),
    }
}

/// act(x) elementwise.
fn activate<T: Real>(x: &[T], act: Activation) -> Vec<T> {
    with_act!(act, |f| par_map2(x, x, |v, _| f(v)))
}

/// f64 lanes of the per-channel reductions: eight independent accumulators in a fixed order
/// (deterministic, and they vectorise where one serial f64 sum waits on every add).
const LANES: usize = 8;

/// Per channel `ch`, in one pass over its N planes of `hw` values, with k = the channel's first
/// value as a shift: (Σ (x - k), Σ (x - k)², k) in f64. The shift keeps E[(x-k)²] - E[x-k]²
/// free of cancellation (k is within the data's range), so one pass serves mean and variance.
#[inline(always)]
fn channel_moments<T: Real>(x: &[T], c: usize, hw: usize, ch: usize) -> (f64, f64, f64) {
    let n = x.len() / (c * hw).max(1);
    let k = if n * hw > 0 { x[ch * hw].f() } else { 0.0 };
    let (mut s, mut q) = ([0f64; LANES], [0f64; LANES]);
    for ni in 0..n {
        let plane = &x[(ni * c + ch) * hw..(ni * c + ch + 1) * hw];
        let chunks = plane.chunks_exact(LANES);
        for (i, v) in chunks.remainder().iter().enumerate() {
            let d = v.f() - k;
            s[i] += d;
            q[i] += d * d;
        }
        for v in chunks {
            for i in 0..LANES {
                let d = v[i].f() - k;
                s[i] += d;
                q[i] += d * d;
            }
        }
    }
    (s.iter().sum(), q.iter().sum(), k)
}

/// Per channel `ch`, in one pass: (Σ gz·(x - centre), Σ gz) over its N planes (the first sum
/// only when `x` is given).
#[inline(always)]
fn channel_grad_sums<T: Real>(gz: &[T], x: Option<(&[T], f64)>, c: usize, hw: usize, ch: usize) -> (f64, f64) {
    let n = gz.len() / (c * hw).max(1);
    let (mut sx, mut s) = ([0f64; LANES], [0f64; LANES]);
    for ni in 0..n {
        let r = (ni * c + ch) * hw..(ni * c + ch + 1) * hw;
        let g = &gz[r.clone()];
        let gc = g.chunks_exact(LANES);
        match x {
            // Both sums in the same pass over gz.
            Some((x, m)) => {
                let xc = x[r].chunks_exact(LANES);
                for (i, (a, b)) in gc.remainder().iter().zip(xc.remainder()).enumerate() {
                    s[i] += a.f();
                    sx[i] += a.f() * (b.f() - m);
                }
                for (a, b) in gc.zip(xc) {
                    for i in 0..LANES {
                        s[i] += a[i].f();
                        sx[i] += a[i].f() * (b[i].f() - m);
                    }
                }
            }
            None => {
                for (i, v) in gc.remainder().iter().enumerate() {
                    s[i] += v.f();
                }
                for v in gc {
                    for i in 0..LANES {
                        s[i] += v[i].f();
                    }
                }
            }
        }
    }
    (sx.iter().sum(), s.iter().sum())
}

impl CustomOp3 for ChannelAffineOp {
    fn name(&self) -> &'static str {
        "channel-affine-act"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, hw) = channel_dims(l1.dims(), self.last);
        let (act, last) = (self.act, self.last);
        dispatch!(self.name(), s1, |T| {
            let (x, sc, sh) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?, slice::<T>(s3, l3)?);
            let y = affine_act(x, sc, sh, hw, act, last);
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        sc: &Tensor,
        _sh: &Tensor,
        y: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (c, hw) = channel_dims(x.dims(), self.last);
        let (act, last) = (self.act, self.last);
        dispatch_dtype!(self.name(), x.dtype(), |T| {
            with_data::<T, _>(x, |xs| {
                with_data::<T, _>(sc, |scs| {
                    with_data::<T, _>(y, |ys| {
                        with_data::<T, _>(gy, |gys| {
                            let gz = pre_activation_grad(gys, ys, act);
                            let gx = if last {
                                rows::affine_map(&gz, scs, &vec![T::zero(); c], |v| v)
                            } else {
                                let mut gx = vec![T::zero(); xs.len()];
                                gx.par_chunks_mut(hw)
                                    .zip(gz.par_chunks(hw))
                                    .enumerate()
                                    .for_each(|(p, (gxp, gzp))| {
                                        let a = scs[p % c];
                                        isa_dispatch!(scale_plane(gxp, gzp, a));
                                    });
                                gx
                            };
                            let (gs, gb) = channel_sums(c, hw, &gz, Some((xs, &vec![0.0; c])), last);
                            Ok((
                                Some(tensor(gx, x.dims())?),
                                Some(tensor(cast::<T>(&gs), &[c])?),
                                Some(tensor(cast::<T>(&gb), &[c])?),
                            ))
                        })
                    })
                })
            })
        })
    }
}

/// Per channel, accumulated in f64: (Σ gz·(x - centre[c]), Σ gz) over all samples and pixels
/// (the first only when `x` is given). Centring before multiplying keeps BatchNorm's weight
/// gradient free of the cancellation that Σ gz·x - mean·Σ gz suffers in f32.
fn channel_sums<T: Real>(c: usize, hw: usize, gz: &[T], x: Option<(&[T], &[f64])>, last: bool) -> (Vec<f64>, Vec<f64>) {
    if last {
        return rows::grad_sums(gz, x, c);
    }
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let x = x.map(|(x, centre)| (x, centre[ch]));
            isa_dispatch!(channel_grad_sums(gz, x, c, hw, ch))
        })
        .unzip()
}

/// f64 values as `T`.
fn cast<T: Real>(v: &[f64]) -> Vec<T> {
    v.iter().map(|x| T::from_f64(*x)).collect()
}

/// y = act(x · scale + shift) with per-channel `scale` and `shift` (C,), x (N, C, ...).
pub fn channel_affine(x: &Tensor, scale: &Tensor, shift: &Tensor, act: Activation) -> Result<Tensor> {
    channel_affine_layout(x, scale, shift, act, false)
}

/// [`channel_affine`] over a channels-last x (..., C) (`last`) or a channels-first one.
pub(crate) fn channel_affine_layout(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    act: Activation,
    last: bool,
) -> Result<Tensor> {
    const OP: &str = "channel_affine";
    if x.rank() < 2 {
        return Err(shape_err(
            OP,
            format!("expected an (N, C, ...) or (..., C) input, got {:?}", x.dims()),
        ));
    }
    let c = if last { x.dim(x.rank() - 1)? } else { x.dim(1)? };
    for (name, t) in [("scale", scale), ("shift", shift)] {
        if t.dims() != [c] {
            return Err(shape_err(
                OP,
                format!("{name} must have shape [{c}], got {:?}", t.dims()),
            ));
        }
    }
    check_float(OP, x)?;
    if x.device().is_cpu() {
        Ok(x.contiguous()?.apply_op3(
            &scale.contiguous()?,
            &shift.contiguous()?,
            ChannelAffineOp { act, last },
        )?)
    } else {
        let mut bshape = vec![1; x.rank()];
        bshape[if last { x.rank() - 1 } else { 1 }] = c;
        let y = x
            .broadcast_mul(&scale.reshape(bshape.clone())?)?
            .broadcast_add(&shift.reshape(bshape)?)?;
        act.apply_tensor(&y)
    }
}

struct ActOp(Activation);

impl CustomOp1 for ActOp {
    fn name(&self) -> &'static str {
        "activation"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let act = self.0;
        dispatch!(self.name(), s, |T| {
            let y = activate(slice::<T>(s, l)?, act);
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, gy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let act = self.0;
        dispatch_dtype!(self.name(), y.dtype(), |T| {
            with_data::<T, _>(y, |ys| {
                with_data::<T, _>(gy, |gys| {
                    let g = pre_activation_grad(gys, ys, act);
                    Ok(Some(tensor(g, y.dims())?))
                })
            })
        })
    }
}

/// ReLU / ReLU6 with a one-pass backward (candle's ReLU backward takes ~6 passes, its ReLU6
/// goes through `clamp`).
pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    if act == Activation::None {
        return Ok(x.clone());
    }
    check_float("activation", x)?;
    if x.device().is_cpu() {
        Ok(x.contiguous()?.apply_op1(ActOp(act))?)
    } else {
        act.apply_tensor(x)
    }
}

/// act(a + b): a residual sum and its activation in one pass.
struct AddActOp(Activation);

impl CustomOp2 for AddActOp {
    fn name(&self) -> &'static str {
        "add-activation"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let act = self.0;
        dispatch!(self.name(), s1, |T| {
            let (a, b) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?);
            let y = with_act!(act, |f| par_map2(a, b, |x, y| f(x + y)));
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }
    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let act = self.0;
        dispatch_dtype!(self.name(), y.dtype(), |T| {
            with_data::<T, _>(y, |ys| {
                with_data::<T, _>(gy, |gys| {
                    let g = tensor(pre_activation_grad(gys, ys, act), y.dims())?;
                    Ok((Some(g.clone()), Some(g)))
                })
            })
        })
    }
}

/// act(a + b) for same-shaped `a` and `b`: the end of a residual block, one pass forward and one
/// backward (instead of an add, an activation and their gradients' bookkeeping).
pub fn add_activation(a: &Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
    const OP: &str = "add_activation";
    check_same_float(OP, a, b)?;
    if a.device().is_cpu() {
        Ok(a.contiguous()?.apply_op2(&b.contiguous()?, AddActOp(act))?)
    } else {
        act.apply_tensor(&(a + b)?)
    }
}

/// Per-channel mean and biased variance of x (N, C, ...), accumulated in f64.
fn batch_stats<T: Real>(c: usize, hw: usize, x: &[T]) -> (Vec<f64>, Vec<f64>) {
    let m = (x.len() / c.max(1)).max(1) as f64;
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let (s, q, k) = isa_dispatch!(channel_moments(x, c, hw, ch));
            let d = s / m;
            (k + d, (q / m - d * d).max(0.0))
        })
        .unzip()
}

/// BatchNorm's input gradient over one plane, in f64:
/// gx = k·(gz - a - xhat·bsum) with xhat = (x - mu)·is; `c` = [k, mu, is, a, bsum].
#[inline(always)]
fn bn_input_grad_plane<T: Real>(gx: &mut [T], gz: &[T], x: &[T], c: [f64; 5]) {
    let [k, mu, is, a, bsum] = c;
    for ((o, g), xv) in gx.iter_mut().zip(gz).zip(x) {
        let xhat = (xv.f() - mu) * is;
        *o = T::from_f64(k * (g.f() - a - xhat * bsum));
    }
}

/// Train-mode BatchNorm over given batch statistics, fused with an activation.
struct BnTrainOp {
    mean: Vec<f64>,
    invstd: Vec<f64>,
    act: Activation,
    /// Channels-last input (rows x C) instead of NCHW planes.
    last: bool,
}

impl CustomOp3 for BnTrainOp {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (c, hw) = channel_dims(l1.dims(), self.last);
        dispatch!(self.name(), s1, |T| {
            let (x, w, b) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?, slice::<T>(s3, l3)?);
            let scale: Vec<T> = (0..c).map(|ch| w[ch] * T::from_f64(self.invstd[ch])).collect();
            let shift: Vec<T> = (0..c)
                .map(|ch| b[ch] - T::from_f64(self.mean[ch]) * scale[ch])
                .collect();
            let y = affine_act(x, &scale, &shift, hw, self.act, self.last);
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (c, hw) = channel_dims(x.dims(), self.last);
        let m = (x.elem_count() / c) as f64;
        dispatch_dtype!(self.name(), x.dtype(), |T| {
            with_data::<T, _>(x, |xs| {
                with_data::<T, _>(w, |ws| {
                    with_data::<T, _>(y, |ys| {
                        with_data::<T, _>(gy, |gys| {
                            let gz = pre_activation_grad(gys, ys, self.act);
                            // Σ gz·xhat = invstd·Σ gz·(x - mean).
                            let (sgx, sg) = channel_sums(c, hw, &gz, Some((xs, &self.mean)), self.last);
                            let sgxhat: Vec<f64> = (0..c).map(|ch| self.invstd[ch] * sgx[ch]).collect();
                            let coef = |ch: usize| {
                                let (mu, is) = (self.mean[ch], self.invstd[ch]);
                                [ws[ch].f() * is, mu, is, sg[ch] / m, sgxhat[ch] / m]
                            };
                            let gx = if self.last {
                                rows::bn_input_grad(&gz, xs, &(0..c).map(coef).collect::<Vec<_>>())
                            } else {
                                let mut gx = vec![T::zero(); xs.len()];
                                gx.par_chunks_mut(hw).enumerate().for_each(|(p, gxp)| {
                                    let r = p * hw..(p + 1) * hw;
                                    isa_dispatch!(bn_input_grad_plane(gxp, &gz[r.clone()], &xs[r], coef(p % c)));
                                });
                                gx
                            };
                            let gw: Vec<T> = sgxhat.iter().map(|v| T::from_f64(*v)).collect();
                            Ok((
                                Some(tensor(gx, x.dims())?),
                                Some(tensor(gw, &[c])?),
                                Some(tensor(cast::<T>(&sg), &[c])?),
                            ))
                        })
                    })
                })
            })
        })
    }
}

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
    /// BatchNorm into the preceding convolution for inference.
    pub fn eval_scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let invstd = (self.running_var.as_tensor() + self.cfg.eps)?.sqrt()?.recip()?;
        let scale = (&self.weight * invstd)?;
        let shift = (&self.bias - (self.running_mean.as_tensor() * &scale)?)?;
        Ok((scale, shift))
    }

    /// BatchNorm followed by `act`, in train (batch statistics, running stats updated) or eval
    /// mode.
    pub fn forward_act(&self, x: &Tensor, train: bool, act: Activation) -> Result<Tensor> {
        let (_, c, _, _) = dims4("batch_norm", x)?;
        self.forward_layout(x, c, train, act, false)
    }

    /// [`forward_act`](Self::forward_act) on a channels-last (N, H, W, C) input
    /// ([`crate::channels_last`]); the output is channels-last too.
    pub fn forward_act_nhwc(&self, x: &Tensor, train: bool, act: Activation) -> Result<Tensor> {
        let c = match x.dims() {
            &[_, _, _, c] => c,
            d => {
                return Err(shape_err(
                    "batch_norm",
                    format!("expected a rank-4 channels-last (N, H, W, C) input, got shape {d:?}"),
                ))
            }
        };
        self.forward_layout(x, c, train, act, true)
    }

    fn forward_layout(&self, x: &Tensor, c: usize, train: bool, act: Activation, last: bool) -> Result<Tensor> {
        const OP: &str = "batch_norm";
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
            return channel_affine_layout(x, &scale, &shift, act, last);
        }
        check_float(OP, x)?;
        let m = x.elem_count() / c;
        if m < 2 {
            return Err(shape_err(
                OP,
                format!(
                    "expected more than 1 value per channel when training, got input shape {:?}",
                    x.dims()
                ),
            ));
        }
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
            let (mean, var) = stats()?;
            let invstd = var.iter().map(|v| 1.0 / (v + self.cfg.eps).sqrt()).collect();
            let op = BnTrainOp {
                mean: mean.clone(),
                invstd,
                act,
                last,
            };
            let y = x.apply_op3(&self.weight.contiguous()?, &self.bias.contiguous()?, op)?;
            let dev = x.device();
            (y, Tensor::new(mean, dev)?, Tensor::new(var, dev)?)
        } else {
            let nchw = if last {
                crate::channels_last::to_channels_first(x)?
            } else {
                x.clone()
            };
            let (y, mean, var) =
                crate::reference::batch_norm_train(&nchw, &self.weight, &self.bias, self.cfg.eps, act)?;
            let y = if last {
                crate::channels_last::to_channels_last(&y)?
            } else {
                y
            };
            (
                y,
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
