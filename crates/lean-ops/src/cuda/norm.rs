//! Train-mode BatchNorm fused with its activation, and the residual add + activation, on CUDA
//! (kernels in norm.cu), NCHW, with backward passes on the device.

use super::{contiguous_view, grid_for, with_view, Kernels, THREADS};
use crate::activation::Activation;
use crate::dist::{combine_moments, sum_over_group, Collective};
use crate::error::Result;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, IndexOp, Layout, Shape, Tensor, WithDType};
use std::sync::Arc;

static KERNELS: Kernels = Kernels::new("lean_norm", include_str!("norm.cu"));

fn act_code(act: Activation) -> i32 {
    match act {
        Activation::None => 0,
        Activation::Relu => 1,
        Activation::Relu6 => 2,
    }
}

fn suffix(dtype: DType) -> candle_core::Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F64 => Ok("f64"),
        d => candle_core::bail!("lean CUDA BatchNorm: unsupported dtype {d:?} (f32 or f64)"),
    }
}

/// (N, C, H·W) of an NCHW layout as kernel ints.
fn nchw(l: &Layout) -> candle_core::Result<[i32; 3]> {
    match l.dims() {
        &[n, c, h, w] => Ok([n as i32, c as i32, (h * w) as i32]),
        d => candle_core::bail!("lean CUDA BatchNorm: expected (N, C, H, W), got {d:?}"),
    }
}

/// One block per channel with THREADS doubles of shared memory for each of two sums.
fn per_channel(c: i32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((c.max(1) as u32).min(65_535), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 2 * THREADS * 8,
    }
}

fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid_for(n), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// x -> stats (3, C) f64: mean, biased variance, 1 / sqrt(var + eps).
struct BnStats {
    eps: f64,
}

impl CustomOp1 for BnStats {
    fn name(&self) -> &'static str {
        "batch-norm-stats-cuda"
    }
    no_cpu_fwd!(a);
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let c = nchw(l)?[1] as usize;
        let out = match s.dtype() {
            DType::F32 => self.launch::<f32>(s, l)?,
            _ => self.launch::<f64>(s, l)?,
        };
        Ok((out, Shape::from((3, c))))
    }
}

impl BnStats {
    fn launch<T: CudaDType + WithDType + DeviceRepr>(
        &self,
        s: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<CudaStorage> {
        let [n, c, hw] = nchw(l)?;
        let dev = s.device.clone();
        let (func, stream) = (
            KERNELS.function(&dev, &format!("bn_stats_{}", suffix(T::DTYPE)?))?,
            dev.cuda_stream(),
        );
        let out = dev.alloc_zeros::<f64>(3 * c as usize)?;
        let x = contiguous_view::<T>(s, l)?;
        let mut b = stream.launch_builder(&func);
        b.arg(&x);
        b.arg(&out);
        b.arg(&n);
        b.arg(&c);
        b.arg(&hw);
        b.arg(&self.eps);
        // SAFETY: arguments as bn_stats_* declares them (x of N·C·H·W elements, 3·C doubles out,
        // the sizes, eps); indices stay below those sizes; THREADS is a power of two and the
        // shared memory holds its two arrays of THREADS doubles.
        unsafe { b.launch(per_channel(c)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

/// (x, weight, bias) -> act(BatchNorm(x)) with the batch statistics `stats`, which span
/// `count` values per channel (more than x's under SyncBN, over `sync`).
struct BnApply {
    stats: Tensor,
    act: Activation,
    count: usize,
    sync: Option<Arc<dyn Collective>>,
}

impl BnApply {
    fn launch<T: CudaDType + WithDType + DeviceRepr + ValidAsZeroBits>(
        &self,
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
    ) -> candle_core::Result<CudaStorage> {
        let [n, c, hw] = nchw(x.1)?;
        let dev = x.0.device.clone();
        let (func, stream) = (
            KERNELS.function(&dev, &format!("bn_apply_{}", suffix(T::DTYPE)?))?,
            dev.cuda_stream(),
        );
        let total = x.1.shape().elem_count();
        let y = dev.alloc_zeros::<T>(total)?;
        let (xv, wv, bv) = (
            contiguous_view::<T>(x.0, x.1)?,
            contiguous_view::<T>(w.0, w.1)?,
            contiguous_view::<T>(b.0, b.1)?,
        );
        with_view::<f64, _>(&self.stats, |stats| {
            let mut a = stream.launch_builder(&func);
            a.arg(&xv);
            a.arg(&wv);
            a.arg(&bv);
            a.arg(stats);
            a.arg(&y);
            a.arg(&n);
            a.arg(&c);
            a.arg(&hw);
            let act = act_code(self.act);
            a.arg(&act);
            // SAFETY: arguments as bn_apply_* declares them; x and y hold N·C·H·W elements,
            // weight and bias C, stats 3·C doubles; every index is below those sizes.
            unsafe { a.launch(elementwise(total)) }.w()?;
            Ok(())
        })?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }
}

impl CustomOp3 for BnApply {
    fn name(&self) -> &'static str {
        "batch-norm-train-cuda"
    }
    no_cpu_fwd!(a, b, c);
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let y = match x.dtype() {
            DType::F32 => self.launch::<f32>((x, lx), (w, lw), (b, lb))?,
            _ => self.launch::<f64>((x, lx), (w, lw), (b, lb))?,
        };
        Ok((y, lx.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gy = gy.contiguous()?;
        let grad = |sums: Option<Tensor>, weight: Option<Tensor>| BnGrad {
            stats: self.stats.clone(),
            sums,
            weight,
            act: self.act,
            count: self.count,
        };
        let sums = gy.apply_op3_no_bwd(y, x, &grad(None, None))?;
        // SyncBN: the input gradient needs the sums over every rank's batch; γ's and β's
        // gradients stay local (the data-parallel gradient sum adds them up).
        let input_sums = match &self.sync {
            Some(g) => {
                let local = sums.to_vec2::<f64>()?;
                let [s, sx] = sum_over_group(g.as_ref(), [&local[0], &local[1]])?;
                Tensor::new(vec![s, sx], x.device())?
            }
            None => sums.clone(),
        };
        let gx = gy.apply_op3_no_bwd(y, x, &grad(Some(input_sums), Some(w.contiguous()?)))?;
        // γ's gradient Σ gz·xhat = invstd · Σ gz·(x - mean); β's Σ gz.
        let gw = (sums.i(1)? * self.stats.i(2)?)?.to_dtype(x.dtype())?;
        let gb = sums.i(0)?.to_dtype(x.dtype())?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// (gy, y, x) -> the per-channel sums (2, C) f64 (`sums` None), or the input gradient (the
/// statistics spanning `count` values per channel).
struct BnGrad {
    stats: Tensor,
    sums: Option<Tensor>,
    weight: Option<Tensor>,
    act: Activation,
    count: usize,
}

impl BnGrad {
    fn launch<T: CudaDType + WithDType + DeviceRepr + ValidAsZeroBits>(
        &self,
        gy: (&CudaStorage, &Layout),
        y: (&CudaStorage, &Layout),
        x: (&CudaStorage, &Layout),
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let [n, c, hw] = nchw(x.1)?;
        let dev = x.0.device.clone();
        let (gyv, yv, xv) = (
            contiguous_view::<T>(gy.0, gy.1)?,
            contiguous_view::<T>(y.0, y.1)?,
            contiguous_view::<T>(x.0, x.1)?,
        );
        let act = act_code(self.act);
        with_view::<f64, _>(&self.stats, |stats| match (&self.sums, &self.weight) {
            (Some(sums), Some(weight)) => {
                let (func, stream) = (
                    KERNELS.function(&dev, &format!("bn_grad_input_{}", suffix(T::DTYPE)?))?,
                    dev.cuda_stream(),
                );
                let total = x.1.shape().elem_count();
                let gx = dev.alloc_zeros::<T>(total)?;
                with_view::<f64, _>(sums, |sums| {
                    with_view::<T, _>(weight, |wv| {
                        let mut a = stream.launch_builder(&func);
                        a.arg(&gyv);
                        a.arg(&yv);
                        a.arg(&xv);
                        a.arg(wv);
                        a.arg(stats);
                        a.arg(sums);
                        a.arg(&gx);
                        a.arg(&n);
                        a.arg(&c);
                        a.arg(&hw);
                        a.arg(&act);
                        let m = self.count as f64;
                        a.arg(&m);
                        // SAFETY: arguments as bn_grad_input_* declares them; gy, y, x and gx
                        // hold N·C·H·W elements, the weight C, stats 3·C and sums 2·C doubles.
                        unsafe { a.launch(elementwise(total)) }.w()?;
                        Ok(())
                    })
                })?;
                Ok((CudaStorage::wrap_cuda_slice(gx, dev.clone()), x.1.shape().clone()))
            }
            _ => {
                let (func, stream) = (
                    KERNELS.function(&dev, &format!("bn_grad_sums_{}", suffix(T::DTYPE)?))?,
                    dev.cuda_stream(),
                );
                let sums = dev.alloc_zeros::<f64>(2 * c as usize)?;
                let mut a = stream.launch_builder(&func);
                a.arg(&gyv);
                a.arg(&yv);
                a.arg(&xv);
                a.arg(stats);
                a.arg(&sums);
                a.arg(&n);
                a.arg(&c);
                a.arg(&hw);
                a.arg(&act);
                // SAFETY: arguments as bn_grad_sums_* declares them; gy, y and x hold N·C·H·W
                // elements, stats 3·C and sums 2·C doubles; THREADS is a power of two and the
                // shared memory holds its two arrays of THREADS doubles.
                unsafe { a.launch(per_channel(c)) }.w()?;
                Ok((
                    CudaStorage::wrap_cuda_slice(sums, dev.clone()),
                    Shape::from((2, c as usize)),
                ))
            }
        })
    }
}

impl CustomOp3 for BnGrad {
    fn name(&self) -> &'static str {
        "batch-norm-grad-cuda"
    }
    no_cpu_fwd!(a, b, c);
    fn cuda_fwd(
        &self,
        gy: &CudaStorage,
        lg: &Layout,
        y: &CudaStorage,
        ly: &Layout,
        x: &CudaStorage,
        lx: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        match x.dtype() {
            DType::F32 => self.launch::<f32>((gy, lg), (y, ly), (x, lx)),
            _ => self.launch::<f64>((gy, lg), (y, ly), (x, lx)),
        }
    }
}

/// Train-mode BatchNorm + `act` of a contiguous NCHW CUDA tensor, over the batches of every
/// rank of `sync` when given (SyncBN: the small per-channel statistics and gradient sums travel
/// through the group on the host): (y, mean, biased variance, values per channel they span),
/// the statistics as f64 (C,) tensors for the running averages.
pub(crate) fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    act: Activation,
    sync: Option<Arc<dyn Collective>>,
) -> Result<(Tensor, Tensor, Tensor, usize)> {
    let x = x.contiguous()?;
    let local = x.elem_count() / x.dim(1)?.max(1);
    let stats = x.apply_op1_no_bwd(&BnStats { eps })?;
    let (stats, count) = match &sync {
        Some(g) => {
            let host = stats.to_vec2::<f64>()?;
            let (mean, var, count) = combine_moments(g.as_ref(), &host[0], &host[1], local)?;
            let invstd = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
            (Tensor::new(vec![mean, var, invstd], x.device())?, count)
        }
        None => (stats, local),
    };
    let y = x.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        BnApply {
            stats: stats.clone(),
            act,
            count,
            sync,
        },
    )?;
    Ok((y, stats.i(0)?, stats.i(1)?, count))
}

/// act(a + b) (forward), or the gradient before the activation (backward: gy, y -> gz).
struct AddAct {
    act: Activation,
    backward: bool,
}

impl CustomOp2 for AddAct {
    fn name(&self) -> &'static str {
        if self.backward {
            "activation-grad-cuda"
        } else {
            "add-activation-cuda"
        }
    }
    no_cpu_fwd!(a, b);
    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + WithDType + DeviceRepr + ValidAsZeroBits>(
            op: &AddAct,
            a: (&CudaStorage, &Layout),
            b: (&CudaStorage, &Layout),
        ) -> candle_core::Result<CudaStorage> {
            let dev = a.0.device.clone();
            let kernel = if op.backward { "act_backward" } else { "add_act" };
            let (func, stream) = (
                KERNELS.function(&dev, &format!("{kernel}_{}", suffix(T::DTYPE)?))?,
                dev.cuda_stream(),
            );
            let total = a.1.shape().elem_count();
            if b.1.shape().elem_count() != total {
                candle_core::bail!("{}: the two inputs differ in size", op.name());
            }
            let out = dev.alloc_zeros::<T>(total)?;
            let (av, bv) = (contiguous_view::<T>(a.0, a.1)?, contiguous_view::<T>(b.0, b.1)?);
            let (n, act) = (total as i64, act_code(op.act));
            let mut args = stream.launch_builder(&func);
            args.arg(&av);
            args.arg(&bv);
            args.arg(&out);
            args.arg(&n);
            args.arg(&act);
            // SAFETY: arguments as add_act_* / act_backward_* declare them; both inputs and the
            // output hold `total` elements (checked above).
            unsafe { args.launch(elementwise(total)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        let out = match a.dtype() {
            DType::F32 => run::<f32>(self, (a, la), (b, lb))?,
            DType::F64 => run::<f64>(self, (a, la), (b, lb))?,
            d => candle_core::bail!("{}: unsupported dtype {d:?}", self.name()),
        };
        Ok((out, la.shape().clone()))
    }
    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gz = gy.contiguous()?.apply_op2_no_bwd(
            y,
            &AddAct {
                act: self.act,
                backward: true,
            },
        )?;
        Ok((Some(gz.clone()), Some(gz)))
    }
}

/// act(a + b) of two CUDA tensors of the same shape and dtype, differentiable in both.
pub(crate) fn add_activation(a: &Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(a.contiguous()?
        .apply_op2(&b.contiguous()?, AddAct { act, backward: false })?)
}
