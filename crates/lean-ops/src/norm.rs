//! The ops behind [`crate::BatchNorm2d`]: per-channel statistics, the training-mode normalise +
//! activation op and its backward, and the channel-wise affine op (eval-mode BatchNorm, folded
//! biases) — over NCHW planes or channels-last rows.

use crate::activation::{pre_activation_grad, with_act, with_act_grad, Activation};
use crate::cpu_op::{CpuOp3, OnCpu};
use crate::error::{check_float, shape_err, Result};
use crate::isa::isa_dispatch;
use crate::kernels::{par_new, rows};
use crate::real::{dispatch_dtype, tensor, with_data, Real};
use candle_core::{Layout, Shape, Tensor};
use num_traits::Zero;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Per-channel affine map and activation: y = act(x · scale[c] + shift[c]), over NCHW planes
/// or, with `last`, over channels-last rows.
struct ChannelAffineOp {
    act: Activation,
    last: bool,
}

/// (channels, values per plane): NCHW planes, or channels-last rows (plane size 1).
pub(crate) fn channel_dims(d: &[usize], last: bool) -> (usize, usize) {
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
    // Every value written: each chunk is one whole plane, mapped from the same plane of x.
    par_new(x.len(), hw, |i, yp| {
        let p = i / hw;
        let (a, b) = (scale[p % c], shift[p % c]);
        isa_dispatch!(affine_act_plane(yp, &x[i..i + yp.len()], a, b, act));
    })
}

/// y = act(x · a + b) over one plane, into uninitialised `y` (as long as `x`: every value written).
#[inline(always)]
fn affine_act_plane<T: Real>(y: &mut [MaybeUninit<T>], x: &[T], a: T, b: T, act: Activation) {
    assert_eq!(y.len(), x.len(), "affine_act_plane: lengths");
    with_act!(act, |f| y.iter_mut().zip(x).for_each(|(yv, xv)| {
        yv.write(f(*xv * a + b));
    }));
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

/// Per channel `ch`, in one pass over its N planes: (Σ gz·(x - m), Σ gz) with gz = d(gy, y)
/// computed on the fly.
#[inline(always)]
fn channel_grad_sums<T: Real>(
    (gy, y, d): (&[T], &[T], impl Fn(T, T) -> T),
    (x, m): (&[T], f64),
    c: usize,
    hw: usize,
    ch: usize,
) -> (f64, f64) {
    let n = gy.len() / (c * hw).max(1);
    let (mut sx, mut s) = ([0f64; LANES], [0f64; LANES]);
    let mut add = |i: usize, g: T, y: T, x: T| {
        let g = d(g, y).f();
        s[i] += g;
        sx[i] += g * (x.f() - m);
    };
    for ni in 0..n {
        let r = (ni * c + ch) * hw..(ni * c + ch + 1) * hw;
        let (gc, yc, xc) = (
            gy[r.clone()].chunks_exact(LANES),
            y[r.clone()].chunks_exact(LANES),
            x[r].chunks_exact(LANES),
        );
        let rem = gc.remainder().iter().zip(yc.remainder()).zip(xc.remainder());
        for (i, ((g, y), x)) in rem.enumerate() {
            add(i, *g, *y, *x);
        }
        for ((g, y), x) in gc.zip(yc).zip(xc) {
            for i in 0..LANES {
                add(i, g[i], y[i], x[i]);
            }
        }
    }
    (sx.iter().sum(), s.iter().sum())
}

impl CpuOp3 for ChannelAffineOp {
    fn name(&self) -> &'static str {
        "channel-affine-act"
    }
    fn fwd<T: Real>(
        &self,
        x: &[T],
        l1: &Layout,
        sc: &[T],
        _l2: &Layout,
        sh: &[T],
        _l3: &Layout,
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let (_, hw) = channel_dims(l1.dims(), self.last);
        let (act, last) = (self.act, self.last);
        let y = affine_act(x, sc, sh, hw, act, last);
        Ok((y, l1.shape().clone()))
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
                            // gx = gz · scale: the forward's map with a zero shift.
                            let gx = affine_act(&gz, scs, &vec![T::zero(); c], hw, Activation::None, last);
                            let (gs, gb) = with_act_grad!(act, |d| {
                                channel_sums(c, hw, (gys, ys, d), (xs, &vec![0.0; c]), last)
                            });
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

/// Per channel, accumulated in f64: (Σ gz·(x - centre[c]), Σ gz) over all samples and pixels,
/// with gz = d(gy, y) the gradient before the activation whose output is y. Centring before
/// multiplying keeps BatchNorm's weight gradient free of the cancellation that
/// Σ gz·x - mean·Σ gz suffers in f32.
fn channel_sums<T: Real>(
    c: usize,
    hw: usize,
    (gy, y, d): (&[T], &[T], impl Fn(T, T) -> T + Sync + Copy),
    (x, centre): (&[T], &[f64]),
    last: bool,
) -> (Vec<f64>, Vec<f64>) {
    if last {
        return rows::grad_sums(gy, y, d, (x, centre), c);
    }
    (0..c)
        .into_par_iter()
        .map(|ch| isa_dispatch!(channel_grad_sums((gy, y, d), (x, centre[ch]), c, hw, ch)))
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
            OnCpu(ChannelAffineOp { act, last }),
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

/// Per-channel mean and biased variance of x (N, C, ...), accumulated in f64.
pub(crate) fn batch_stats<T: Real>(c: usize, hw: usize, x: &[T]) -> (Vec<f64>, Vec<f64>) {
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
/// gx = k·(gz - a - xhat·bsum) with xhat = (x - mu)·is and gz = d(gy, y);
/// `c` = [k, mu, is, a, bsum].
#[inline(always)]
fn bn_input_grad_plane<T: Real>(
    gx: &mut [MaybeUninit<T>],
    (gy, y, d): (&[T], &[T], impl Fn(T, T) -> T),
    x: &[T],
    c: [f64; 5],
) {
    assert!(
        gy.len() == gx.len() && y.len() == gx.len() && x.len() == gx.len(),
        "bn_input_grad_plane: lengths"
    );
    let [k, mu, is, a, bsum] = c;
    for (((o, g), y), xv) in gx.iter_mut().zip(gy).zip(y).zip(x) {
        let xhat = (xv.f() - mu) * is;
        o.write(T::from_f64(k * (d(*g, *y).f() - a - xhat * bsum)));
    }
}

/// Train-mode BatchNorm over given batch statistics, fused with an activation.
pub(crate) struct BnTrainOp {
    pub(crate) mean: Vec<f64>,
    pub(crate) invstd: Vec<f64>,
    pub(crate) act: Activation,
    /// Channels-last input (rows x C) instead of NCHW planes.
    pub(crate) last: bool,
    /// SyncBN: the group whose batches the statistics span, and their total count per channel.
    pub(crate) sync: Option<(std::sync::Arc<dyn crate::dist::Collective>, usize)>,
}

impl CpuOp3 for BnTrainOp {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }
    fn fwd<T: Real>(
        &self,
        x: &[T],
        l1: &Layout,
        w: &[T],
        _l2: &Layout,
        b: &[T],
        _l3: &Layout,
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let (_, hw) = channel_dims(l1.dims(), self.last);
        let (scale, shift) = self.scale_shift(w, b);
        let y = affine_act(x, &scale, &shift, hw, self.act, self.last);
        Ok((y, l1.shape().clone()))
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
        let m = match &self.sync {
            Some((_, count)) => *count as f64,
            None => (x.elem_count() / c) as f64,
        };
        dispatch_dtype!(self.name(), x.dtype(), |T| {
            with_data::<T, _>(x, |xs| {
                with_data::<T, _>(w, |ws| {
                    with_data::<T, _>(y, |ys| {
                        with_data::<T, _>(gy, |gys| {
                            with_act_grad!(self.act, |d| {
                                // Σ gz·xhat = invstd·Σ gz·(x - mean).
                                let sums = channel_sums(c, hw, (gys, ys, d), (xs, &self.mean), self.last);
                                let (gx, sgxhat, sg) = self.input_grad(c, hw, m, (gys, ys, d), xs, ws, sums)?;
                                Ok((
                                    Some(tensor(gx, x.dims())?),
                                    Some(tensor(cast::<T>(&sgxhat), &[c])?),
                                    Some(tensor(cast::<T>(&sg), &[c])?),
                                ))
                            })
                        })
                    })
                })
            })
        })
    }
}

impl BnTrainOp {
    /// The normalisation as a per-channel affine map: scale = w·invstd, shift = b - mean·scale.
    fn scale_shift<T: Real>(&self, w: &[T], b: &[T]) -> (Vec<T>, Vec<T>) {
        let scale: Vec<T> = (0..self.mean.len())
            .map(|ch| w[ch] * T::from_f64(self.invstd[ch]))
            .collect();
        let shift = (0..self.mean.len())
            .map(|ch| b[ch] - T::from_f64(self.mean[ch]) * scale[ch])
            .collect();
        (scale, shift)
    }

    /// The input gradient and the weight and bias gradients' sums (Σ gz·xhat, Σ gz), from the
    /// per-channel sums (Σ gz·(x - mean), Σ gz) of this rank's batch.
    #[allow(clippy::too_many_arguments)]
    fn input_grad<T: Real>(
        &self,
        c: usize,
        hw: usize,
        m: f64,
        (gys, ys, d): (&[T], &[T], impl Fn(T, T) -> T + Sync + Copy),
        xs: &[T],
        ws: &[T],
        (sgx, sg): (Vec<f64>, Vec<f64>),
    ) -> candle_core::Result<(Vec<T>, Vec<f64>, Vec<f64>)> {
        let sgxhat: Vec<f64> = (0..c).map(|ch| self.invstd[ch] * sgx[ch]).collect();
        // SyncBN: the input gradient needs the sums over every rank's batch; the weight and
        // bias gradients stay local (the data-parallel gradient sum adds them up, as for every
        // other parameter).
        let [gsg, gsgxhat] = match &self.sync {
            Some((g, _)) => crate::dist::sum_over_group(g.as_ref(), [&sg, &sgxhat])?,
            None => [sg.clone(), sgxhat.clone()],
        };
        let coef = |ch: usize| {
            let (mu, is) = (self.mean[ch], self.invstd[ch]);
            [ws[ch].f() * is, mu, is, gsg[ch] / m, gsgxhat[ch] / m]
        };
        let gx = if self.last {
            rows::bn_input_grad(gys, ys, d, xs, &(0..c).map(coef).collect::<Vec<_>>())
        } else {
            // Every value written: each chunk is one whole plane (asserted in the kernel).
            par_new(xs.len(), hw, |i, gxp| {
                let r = i..i + gxp.len();
                let (g, y) = (&gys[r.clone()], &ys[r.clone()]);
                isa_dispatch!(bn_input_grad_plane(gxp, (g, y, d), &xs[r], coef(i / hw % c)));
            })
        };
        Ok((gx, sgxhat, sg))
    }
}

/// Train-mode BatchNorm, residual add and activation over channels-last rows in one op:
/// y = act((x·scale + shift) + r), on the inputs (x, [weight; bias], r). The same operations in
/// the same order as [`BnTrainOp`] without activation followed by the residual add and the
/// activation, so both give the same values; the wrapped op's `act` is the one after the add.
pub(crate) struct BnAddActOp(pub(crate) BnTrainOp);

impl CpuOp3 for BnAddActOp {
    fn name(&self) -> &'static str {
        "batch-norm-add-act"
    }
    fn fwd<T: Real>(
        &self,
        x: &[T],
        l1: &Layout,
        wb: &[T],
        _l2: &Layout,
        r: &[T],
        _l3: &Layout,
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let c = self.0.mean.len();
        assert!(
            self.0.last && wb.len() == 2 * c && r.len() == x.len(),
            "batch-norm-add-act: channels-last input, residual and (2C) parameters"
        );
        let (scale, shift) = self.0.scale_shift(&wb[..c], &wb[c..]);
        let y = with_act!(self.0.act, |f| rows::affine_add_map(x, r, &scale, &shift, f));
        Ok((y, l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        _r: &Tensor,
        y: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = &self.0;
        let c = op.mean.len();
        let m = match &op.sync {
            Some((_, count)) => *count as f64,
            None => (x.elem_count() / c) as f64,
        };
        dispatch_dtype!(self.name(), x.dtype(), |T| {
            with_data::<T, _>(x, |xs| {
                with_data::<T, _>(wb, |wbs| {
                    with_data::<T, _>(y, |ys| {
                        with_data::<T, _>(gy, |gys| {
                            with_act_grad!(op.act, |d| {
                                // gz, the gradient before the activation, is the residual's
                                // gradient and BatchNorm's output gradient: stored once, in
                                // the pass that sums it.
                                let (gz, sums) = rows::grad_sums_keep(gys, ys, d, (xs, &op.mean), c);
                                let identity = crate::activation::identity_grad;
                                let (gx, sgxhat, sg) =
                                    op.input_grad(c, 1, m, (&gz[..], &gz[..], identity), xs, &wbs[..c], sums)?;
                                let gwb: Vec<T> = cast::<T>(&sgxhat).into_iter().chain(cast::<T>(&sg)).collect();
                                Ok((
                                    Some(tensor(gx, x.dims())?),
                                    Some(tensor(gwb, &[2 * c])?),
                                    Some(tensor(gz, x.dims())?),
                                ))
                            })
                        })
                    })
                })
            })
        })
    }
}
