//! The grouped sparse-stencil convolution on CUDA: forward, input gradient and weight gradient
//! as candle ops whose backward stays on the device (kernels in stencil.cu).

use super::{contiguous_view, Kernels, THREADS};
use crate::error::Result;
use crate::lean_conv_config::LeanConv2dConfig;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, CustomOp2, DType, Layout, Shape, Tensor};

static KERNELS: Kernels = Kernels::new("lean_stencil", include_str!("stencil.cu"));

/// The sizes every kernel takes, in its argument order.
#[derive(Clone, Debug)]
struct Geometry {
    taps: Vec<i32>,
    /// n, cin, h, w, cout, ho, wo, g, opg, s, d, |S|.
    ints: [i32; 12],
}

impl Geometry {
    fn new(cfg: &LeanConv2dConfig, n: usize, h: usize, w: usize) -> Self {
        let (ho, wo) = cfg.output_hw(h, w);
        let taps: Vec<i32> = cfg
            .stencil
            .taps()
            .iter()
            .flat_map(|&(dy, dx)| [dy as i32, dx as i32])
            .collect();
        let opg = cfg.out_channels / cfg.groups();
        let v = [
            n,
            cfg.in_channels,
            h,
            w,
            cfg.out_channels,
            ho,
            wo,
            cfg.group_size,
            opg,
            cfg.stride,
            cfg.dilation,
            cfg.stencil.len(),
        ];
        Geometry {
            taps,
            ints: v.map(|x| x as i32),
        }
    }
    fn n_cin_h_w(&self) -> usize {
        self.ints[..4].iter().map(|&v| v as usize).product()
    }
    fn n_cout_ho_wo(&self) -> usize {
        [0, 4, 5, 6].iter().map(|&i| self.ints[i] as usize).product()
    }
    fn weights(&self) -> usize {
        [4, 7, 11].iter().map(|&i| self.ints[i] as usize).product()
    }
}

/// Which kernel of cuda/stencil.cu.
#[derive(Clone, Copy, Debug)]
enum Kernel {
    /// (x, q) -> y.
    Forward,
    /// (gy, q) -> gx.
    GradInput,
    /// (gy, x) -> gq.
    GradWeight,
}

struct StencilCuda {
    kernel: Kernel,
    geo: Geometry,
}

impl StencilCuda {
    fn out_len(&self) -> usize {
        match self.kernel {
            Kernel::Forward => self.geo.n_cout_ho_wo(),
            Kernel::GradInput => self.geo.n_cin_h_w(),
            Kernel::GradWeight => self.geo.weights(),
        }
    }

    fn out_shape(&self) -> Shape {
        let i = |k: usize| self.geo.ints[k] as usize;
        match self.kernel {
            Kernel::Forward => Shape::from((i(0), i(4), i(5), i(6))),
            Kernel::GradInput => Shape::from((i(0), i(1), i(2), i(3))),
            Kernel::GradWeight => Shape::from((i(4), i(7), i(11))),
        }
    }

    fn launch<T>(
        &self,
        dev: &CudaDevice,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<CudaStorage>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::WithDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr
            + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
    {
        let suffix = if T::DTYPE == DType::F64 { "f64" } else { "f32" };
        let name = match self.kernel {
            Kernel::Forward => format!("stencil_fwd_{suffix}"),
            Kernel::GradInput => format!("stencil_grad_input_{suffix}"),
            Kernel::GradWeight => format!("stencil_grad_weight_{suffix}"),
        };
        let (func, stream) = (KERNELS.function(dev, &name)?, dev.cuda_stream());
        let (a, b) = (contiguous_view::<T>(a, la)?, contiguous_view::<T>(b, lb)?);
        let out = dev.alloc_zeros::<T>(self.out_len())?;
        let taps = dev.clone_htod(&self.geo.taps)?;
        let n = self.out_len() as u32;
        let (grid, shared) = match self.kernel {
            // One block per weight, a tree reduction over THREADS partial sums.
            Kernel::GradWeight => (n.clamp(1, 65_535), THREADS * std::mem::size_of::<T>() as u32),
            _ => (n.div_ceil(THREADS).clamp(1, 65_535), 0),
        };
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: shared,
        };
        let mut builder = stream.launch_builder(&func);
        builder.arg(&a);
        builder.arg(&b);
        builder.arg(&out);
        builder.arg(&taps);
        for v in &self.geo.ints {
            builder.arg(v);
        }
        // SAFETY: the kernel's arguments match its signature in cuda/stencil.cu (three device
        // buffers of T, the taps as i32, twelve i32 sizes); the buffers hold the element counts
        // the sizes imply (checked by the callers' shape validation and `out_len`), every index
        // the kernel forms is bounds-checked against those sizes, and THREADS is a power of two
        // as the weight-gradient reduction requires, with its shared memory sized to match.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp2 for StencilCuda {
    fn name(&self) -> &'static str {
        match self.kernel {
            Kernel::Forward => "grouped-stencil-cuda",
            Kernel::GradInput => "grouped-stencil-grad-input-cuda",
            Kernel::GradWeight => "grouped-stencil-grad-weight-cuda",
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
        let dev = a.device.clone();
        let out = match a.dtype() {
            DType::F32 => self.launch::<f32>(&dev, a, la, b, lb)?,
            DType::F64 => self.launch::<f64>(&dev, a, la, b, lb)?,
            dtype => candle_core::bail!("{}: unsupported dtype {dtype:?} (f32 or f64)", self.name()),
        };
        Ok((out, self.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        q: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gy = gy.contiguous()?;
        let op = |kernel| StencilCuda {
            kernel,
            geo: self.geo.clone(),
        };
        let gx = gy.apply_op2_no_bwd(q, &op(Kernel::GradInput))?;
        let gq = gy.apply_op2_no_bwd(x, &op(Kernel::GradWeight))?;
        Ok((Some(gx), Some(gq)))
    }
}

/// The grouped stencil convolution of `cfg` on CUDA tensors x (N, Cin, H, W) and q (Cout, g,
/// |S|), shapes already checked; differentiable in both.
pub(crate) fn grouped_stencil_conv2d(x: &Tensor, q: &Tensor, cfg: &LeanConv2dConfig) -> Result<Tensor> {
    let (n, _, h, w) = x.dims4()?;
    let op = StencilCuda {
        kernel: Kernel::Forward,
        geo: Geometry::new(cfg, n, h, w),
    };
    Ok(x.contiguous()?.apply_op2(&q.contiguous()?, op)?)
}
