//! Max and average pooling with padding and any kernel / stride, and global average pooling.

use crate::cpu_op::{CpuOp1, OnCpu};
use crate::error::{check_float, config_err, dims4, shape_err, Result};
use crate::real::{dispatch_dtype, tensor, with_data, Real};
use candle_core::{Layout, Shape, Tensor};
use rayon::prelude::*;

/// Configuration of a 2-d pooling window (square kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2dConfig {
    /// Window size.
    pub kernel_size: usize,
    /// Stride.
    pub stride: usize,
    /// Implicit padding on every side (at most kernel_size / 2, as in PyTorch).
    pub padding: usize,
    /// Average pooling only: whether padded zeros count in the divisor (PyTorch's default: true).
    pub count_include_pad: bool,
}

impl Pool2dConfig {
    /// A `k` x `k` window with stride `s` and padding `p`.
    pub fn new(k: usize, s: usize, p: usize) -> Self {
        Pool2dConfig {
            kernel_size: k,
            stride: s,
            padding: p,
            count_include_pad: true,
        }
    }

    /// Output size for an input of `h` x `w` (floor mode).
    pub fn output_hw(&self, op: &'static str, h: usize, w: usize) -> Result<(usize, usize)> {
        let (k, s, p) = (self.kernel_size, self.stride, self.padding);
        if k == 0 || s == 0 {
            return Err(config_err(
                op,
                format!("kernel_size and stride must be >= 1, got {self:?}"),
            ));
        }
        if 2 * p > k {
            return Err(config_err(
                op,
                format!("padding {p} must be at most half the kernel size {k}"),
            ));
        }
        if h + 2 * p < k || w + 2 * p < k {
            return Err(shape_err(
                op,
                format!("input {h}x{w} (padding {p}) is smaller than the kernel {k}"),
            ));
        }
        Ok(((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1))
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Max,
    Avg,
}

struct PoolOp {
    kind: Kind,
    cfg: Pool2dConfig,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
}

impl PoolOp {
    /// Input window [y0, y1) x [x0, x1) (clipped to the image) and the average divisor.
    #[inline]
    fn window(&self, oy: usize, ox: usize) -> (usize, usize, usize, usize, usize) {
        let (k, s, p) = (
            self.cfg.kernel_size as isize,
            self.cfg.stride as isize,
            self.cfg.padding as isize,
        );
        let (ys, xs) = (oy as isize * s - p, ox as isize * s - p);
        let (y0, x0) = (ys.max(0) as usize, xs.max(0) as usize);
        let (y1, x1) = (
            (ys + k).min(self.h as isize) as usize,
            (xs + k).min(self.w as isize) as usize,
        );
        let div = if self.cfg.count_include_pad {
            // PyTorch counts padded positions but not positions past the padded border.
            let (ye, xe) = ((ys + k).min(self.h as isize + p), (xs + k).min(self.w as isize + p));
            ((ye - ys) * (xe - xs)) as usize
        } else {
            (y1 - y0) * (x1 - x0)
        };
        (y0, y1, x0, x1, div)
    }

    /// The first maximum of the window (PyTorch's choice among ties), as a plane index.
    #[inline]
    fn argmax<T: Real>(&self, plane: &[T], oy: usize, ox: usize) -> usize {
        let (y0, y1, x0, x1, _) = self.window(oy, ox);
        let mut best = y0 * self.w + x0;
        for y in y0..y1 {
            for x in x0..x1 {
                let i = y * self.w + x;
                if plane[i] > plane[best] || plane[i].is_nan() {
                    best = i;
                }
            }
        }
        best
    }

    fn forward<T: Real>(&self, x: &[T]) -> Vec<T> {
        let (hw, ohw) = (self.h * self.w, self.ho * self.wo);
        let mut y = vec![T::zero(); x.len() / hw * ohw];
        y.par_chunks_mut(ohw).zip(x.par_chunks(hw)).for_each(|(yp, xp)| {
            for oy in 0..self.ho {
                for ox in 0..self.wo {
                    yp[oy * self.wo + ox] = match self.kind {
                        Kind::Max => xp[self.argmax(xp, oy, ox)],
                        Kind::Avg => {
                            let (y0, y1, x0, x1, div) = self.window(oy, ox);
                            let s: T = (y0..y1)
                                .map(|yy| xp[yy * self.w + x0..yy * self.w + x1].iter().copied().sum::<T>())
                                .sum();
                            s / T::from_f64(div as f64)
                        }
                    };
                }
            }
        });
        y
    }

    fn backward<T: Real>(&self, x: &[T], gy: &[T]) -> Vec<T> {
        let (hw, ohw) = (self.h * self.w, self.ho * self.wo);
        let mut gx = vec![T::zero(); x.len()];
        gx.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .zip(gy.par_chunks(ohw))
            .for_each(|((gp, xp), gyp)| {
                for oy in 0..self.ho {
                    for ox in 0..self.wo {
                        let g = gyp[oy * self.wo + ox];
                        match self.kind {
                            Kind::Max => gp[self.argmax(xp, oy, ox)] += g,
                            Kind::Avg => {
                                let (y0, y1, x0, x1, div) = self.window(oy, ox);
                                let v = g / T::from_f64(div as f64);
                                for yy in y0..y1 {
                                    gp[yy * self.w + x0..yy * self.w + x1].iter_mut().for_each(|e| *e += v);
                                }
                            }
                        }
                    }
                }
            });
        gx
    }
}

impl CpuOp1 for PoolOp {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Max => "max-pool2d",
            Kind::Avg => "avg-pool2d",
        }
    }
    fn fwd<T: Real>(&self, s: &[T], l: &Layout) -> candle_core::Result<(Vec<T>, Shape)> {
        let d = l.dims();
        let y = self.forward(s);
        Ok((y, Shape::from((d[0], d[1], self.ho, self.wo))))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, gy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        dispatch_dtype!(self.name(), x.dtype(), |T| {
            with_data::<T, _>(x, |xs| {
                with_data::<T, _>(gy, |gys| Ok(Some(tensor(self.backward(xs, gys), x.dims())?)))
            })
        })
    }
}

fn pool(op: &'static str, kind: Kind, x: &Tensor, cfg: &Pool2dConfig) -> Result<Tensor> {
    let (_, _, h, w) = dims4(op, x)?;
    let (ho, wo) = cfg.output_hw(op, h, w)?;
    check_float(op, x)?;
    if x.device().is_cpu() {
        Ok(x.contiguous()?.apply_op1(OnCpu(PoolOp {
            kind,
            cfg: *cfg,
            h,
            w,
            ho,
            wo,
        }))?)
    } else {
        match kind {
            Kind::Max => crate::reference::max_pool2d(x, cfg),
            Kind::Avg => crate::reference::avg_pool2d(x, cfg),
        }
    }
}

/// Max pooling with padding (padded positions never win), any kernel and stride; the gradient
/// goes to the first maximum of each window, as in PyTorch.
pub fn max_pool2d(x: &Tensor, cfg: &Pool2dConfig) -> Result<Tensor> {
    pool("max_pool2d", Kind::Max, x, cfg)
}

/// Average pooling with padding (see [`Pool2dConfig::count_include_pad`]), any kernel and stride.
pub fn avg_pool2d(x: &Tensor, cfg: &Pool2dConfig) -> Result<Tensor> {
    pool("avg_pool2d", Kind::Avg, x, cfg)
}

/// Global average pooling: (N, C, H, W) -> (N, C).
pub fn global_avg_pool2d(x: &Tensor) -> Result<Tensor> {
    let (n, c, _, _) = dims4("global_avg_pool2d", x)?;
    Ok(x.flatten_from(2)?.mean(2)?.reshape((n, c))?)
}
