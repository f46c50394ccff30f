//! Our CUDA kernels (feature `cuda`): the lean convolution's grouped stencil (stencil.rs), and
//! train-mode BatchNorm + activation and the residual add + activation (norm.rs), as candle ops
//! whose backward passes stay on the device. The pointwise branch of a lean convolution uses
//! candle's cuBLAS-backed 1x1 convolution.
//!
//! The kernel sources (*.cu here) are compiled at run time by NVRTC, once per process and module,
//! for the GPU at hand: no build step beyond candle's own and PTX for exactly the device's
//! architecture. The same sources are compiled for the host by the tests (tests/cuda_host) to
//! check their arithmetic against oracles on machines without a GPU.

/// The `cpu_fwd` of a CUDA-only custom op of 1, 2 or 3 inputs: an error (the public functions
/// send CPU tensors to the CPU ops before any of these is built).
macro_rules! no_cpu_fwd {
    ($($arg:ident),+) => {
        fn cpu_fwd(
            &self,
            $($arg: &candle_core::CpuStorage, _: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $(let _ = $arg;)+
            candle_core::bail!("{}: a CUDA op was given CPU tensors", self.name())
        }
    };
}

pub(crate) mod norm;
pub(crate) mod stencil;

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaView};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, CudaStorage, Layout, Storage, Tensor};
use std::sync::OnceLock;

/// Threads per block (a power of two: the block reductions halve it).
pub(crate) const THREADS: u32 = 256;

/// A kernel source, compiled on first use.
pub(crate) struct Kernels {
    module: &'static str,
    source: &'static str,
    ptx: OnceLock<Result<String, String>>,
}

impl Kernels {
    pub(crate) const fn new(module: &'static str, source: &'static str) -> Self {
        Kernels {
            module,
            source,
            ptx: OnceLock::new(),
        }
    }

    /// Kernel `name` of this source on `dev` (launched with `dev.cuda_stream().launch_builder`).
    pub(crate) fn function(&self, dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
        let ptx = self
            .ptx
            .get_or_init(|| {
                nvrtc::compile_ptx(self.source)
                    .map(|p| p.to_src())
                    .map_err(|e| format!("NVRTC could not compile the {} kernels: {e:?}", self.module))
            })
            .as_ref()
            .map_err(|e| candle_core::Error::Msg(e.clone()))?;
        Ok(dev
            .get_or_load_custom_func(name, self.module, ptx)?
            .into_cuda_function())
    }
}

/// The elements of a contiguous CUDA tensor's layout.
pub(crate) fn contiguous_view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
        None => candle_core::bail!("lean CUDA kernels: inputs must be contiguous"),
    }
}

/// Runs `f` on the device elements of a contiguous CUDA tensor that is not an op's input.
pub(crate) fn with_view<T: CudaDType, R>(
    t: &Tensor,
    f: impl FnOnce(&CudaView<'_, T>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => f(&contiguous_view::<T>(s, layout)?),
        _ => candle_core::bail!("lean CUDA kernels: a tensor is not on the GPU"),
    }
}

/// Grid size for a grid-stride loop over `n` elements.
pub(crate) fn grid_for(n: usize) -> u32 {
    (n.div_ceil(THREADS as usize)).clamp(1, 65_535) as u32
}
