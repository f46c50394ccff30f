//! Bilinear upsampling (both `align_corners` conventions) and channel shuffle.

use crate::cpu_op::{CpuOp1, OnCpu};
use crate::error::{check_float, config_err, dims4, Result};
use crate::real::{dispatch_dtype, tensor, with_data, Real};
use candle_core::{Layout, Shape, Tensor};
use rayon::prelude::*;

/// For each output index: (i0, i1, weight of i1), PyTorch's bilinear source coordinates.
pub(crate) fn interp_taps(input: usize, output: usize, align_corners: bool) -> Vec<(usize, usize, f64)> {
    (0..output)
        .map(|o| {
            let src = if align_corners {
                if output > 1 {
                    o as f64 * (input as f64 - 1.0) / (output as f64 - 1.0)
                } else {
                    0.0
                }
            } else {
                ((o as f64 + 0.5) * input as f64 / output as f64 - 0.5).max(0.0)
            };
            let i0 = (src.floor() as usize).min(input - 1);
            let i1 = (i0 + 1).min(input - 1);
            (i0, i1, src - i0 as f64)
        })
        .collect()
}

struct BilinearOp {
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    ys: Vec<(usize, usize, f64)>,
    xs: Vec<(usize, usize, f64)>,
}

impl BilinearOp {
    fn forward<T: Real>(&self, x: &[T]) -> Vec<T> {
        let (hw, ohw) = (self.h * self.w, self.ho * self.wo);
        let mut y = vec![T::zero(); x.len() / hw * ohw];
        y.par_chunks_mut(ohw).zip(x.par_chunks(hw)).for_each(|(yp, xp)| {
            for (oy, &(y0, y1, ly)) in self.ys.iter().enumerate() {
                for (ox, &(x0, x1, lx)) in self.xs.iter().enumerate() {
                    let v = (1.0 - ly) * ((1.0 - lx) * xp[y0 * self.w + x0].f() + lx * xp[y0 * self.w + x1].f())
                        + ly * ((1.0 - lx) * xp[y1 * self.w + x0].f() + lx * xp[y1 * self.w + x1].f());
                    yp[oy * self.wo + ox] = T::from_f64(v);
                }
            }
        });
        y
    }
    fn backward<T: Real>(&self, gy: &[T]) -> Vec<T> {
        let (hw, ohw) = (self.h * self.w, self.ho * self.wo);
        let mut gx = vec![T::zero(); gy.len() / ohw * hw];
        gx.par_chunks_mut(hw).zip(gy.par_chunks(ohw)).for_each(|(gp, gyp)| {
            for (oy, &(y0, y1, ly)) in self.ys.iter().enumerate() {
                for (ox, &(x0, x1, lx)) in self.xs.iter().enumerate() {
                    let g = gyp[oy * self.wo + ox].f();
                    for (i, wgt) in [
                        (y0 * self.w + x0, (1.0 - ly) * (1.0 - lx)),
                        (y0 * self.w + x1, (1.0 - ly) * lx),
                        (y1 * self.w + x0, ly * (1.0 - lx)),
                        (y1 * self.w + x1, ly * lx),
                    ] {
                        gp[i] += T::from_f64(g * wgt);
                    }
                }
            }
        });
        gx
    }
}

impl CpuOp1 for BilinearOp {
    fn name(&self) -> &'static str {
        "upsample-bilinear2d"
    }
    fn fwd<T: Real>(&self, s: &[T], l: &Layout) -> candle_core::Result<(Vec<T>, Shape)> {
        let d = l.dims();
        let y = self.forward(s);
        Ok((y, Shape::from((d[0], d[1], self.ho, self.wo))))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, gy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        dispatch_dtype!(self.name(), x.dtype(), |T| with_data::<T, _>(gy, |g| Ok(Some(tensor(
            self.backward(g),
            x.dims()
        )?))))
    }
}

/// Bilinear resampling of (N, C, H, W) to (N, C, out_h, out_w) with PyTorch's
/// `F.interpolate(mode="bilinear", align_corners=...)` semantics (output size given).
pub fn upsample_bilinear2d(x: &Tensor, out_h: usize, out_w: usize, align_corners: bool) -> Result<Tensor> {
    const OP: &str = "upsample_bilinear2d";
    let (_, _, h, w) = dims4(OP, x)?;
    if out_h == 0 || out_w == 0 || h == 0 || w == 0 {
        return Err(config_err(
            OP,
            format!("sizes must be positive, got input {h}x{w} and output {out_h}x{out_w}"),
        ));
    }
    check_float(OP, x)?;
    if x.device().is_cpu() {
        let op = BilinearOp {
            h,
            w,
            ho: out_h,
            wo: out_w,
            ys: interp_taps(h, out_h, align_corners),
            xs: interp_taps(w, out_w, align_corners),
        };
        Ok(x.contiguous()?.apply_op1(OnCpu(op))?)
    } else {
        crate::reference::upsample_bilinear2d(x, out_h, out_w, align_corners)
    }
}

/// Output channel o takes input channel perm[o].
struct ChannelPermuteOp {
    perm: Vec<usize>,
}

impl ChannelPermuteOp {
    fn apply<T: Real>(&self, x: &[T], plane: usize) -> Vec<T> {
        let c = self.perm.len();
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(plane).enumerate().for_each(|(p, yp)| {
            let (n, o) = (p / c, p % c);
            let src = (n * c + self.perm[o]) * plane;
            yp.copy_from_slice(&x[src..src + plane]);
        });
        y
    }
}

impl CpuOp1 for ChannelPermuteOp {
    fn name(&self) -> &'static str {
        "channel-permute"
    }
    fn fwd<T: Real>(&self, s: &[T], l: &Layout) -> candle_core::Result<(Vec<T>, Shape)> {
        let plane = l.dims()[2..].iter().product();
        Ok((self.apply(s, plane), l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, gy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let mut inv = vec![0; self.perm.len()];
        for (o, &i) in self.perm.iter().enumerate() {
            inv[i] = o;
        }
        Ok(Some(
            gy.contiguous()?
                .apply_op1_no_bwd(&OnCpu(ChannelPermuteOp { perm: inv }))?,
        ))
    }
}

/// ShuffleNet's channel shuffle: view C as (groups, C/groups), transpose, flatten.
pub fn channel_shuffle(x: &Tensor, groups: usize) -> Result<Tensor> {
    const OP: &str = "channel_shuffle";
    let (_, c, _, _) = dims4(OP, x)?;
    if groups == 0 || c % groups != 0 {
        return Err(config_err(OP, format!("groups {groups} must divide the {c} channels")));
    }
    check_float(OP, x)?;
    if x.device().is_cpu() {
        let per = c / groups;
        // Output channel o = j·groups + g reads input channel g·per + j.
        let perm = (0..c).map(|o| (o % groups) * per + o / groups).collect();
        Ok(x.contiguous()?.apply_op1(OnCpu(ChannelPermuteOp { perm }))?)
    } else {
        crate::reference::channel_shuffle(x, groups)
    }
}
