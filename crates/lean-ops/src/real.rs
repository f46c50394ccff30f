//! The scalar trait of the CPU kernels and helpers to reach a tensor's CPU data.

use candle_core::{CpuStorage, Layout, Storage, Tensor, WithDType};

/// f32 or f64: what the CPU kernels compute with.
pub(crate) trait Real: WithDType + num_traits::Float + Default + std::iter::Sum {
    /// The value as f64.
    #[inline]
    fn f(self) -> f64 {
        WithDType::to_f64(self)
    }
    /// The values as f32, for kernels that only exist in f32 (`None` for f64).
    #[inline]
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    /// [`Real::as_f32`] for values to update in place.
    #[inline]
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    /// [`Real::as_f32`] for an output to be written.
    #[inline]
    fn as_f32_out(_: &mut [std::mem::MaybeUninit<Self>]) -> Option<&mut [std::mem::MaybeUninit<f32>]> {
        None
    }
}
impl Real for f32 {
    #[inline]
    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    #[inline]
    fn as_f32_mut(s: &mut [f32]) -> Option<&mut [f32]> {
        Some(s)
    }
    #[inline]
    fn as_f32_out(s: &mut [std::mem::MaybeUninit<f32>]) -> Option<&mut [std::mem::MaybeUninit<f32>]> {
        Some(s)
    }
}
impl Real for f64 {}

/// The contiguous data of a storage seen through `layout`.
pub(crate) fn slice<'a, T: Real>(s: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("lean-ops kernel: non-contiguous input (internal error)"),
    }
}

/// Runs `f` on the contiguous CPU data of a tensor (used in backward passes).
pub(crate) fn with_data<T: Real, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(slice::<T>(s, layout)?),
        _ => candle_core::bail!("lean-ops kernel: tensor is not on the CPU (internal error)"),
    }
}

/// Builds a CPU tensor from a vector.
pub(crate) fn tensor<T: Real>(v: Vec<T>, shape: &[usize]) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

/// Dispatches a generic kernel on the dtype of a CPU storage (f32 or f64).
macro_rules! dispatch {
    ($op:expr, $s:expr, |$t:ident| $body:expr) => {
        match $s {
            candle_core::CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            candle_core::CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            other => candle_core::bail!(
                "{}: unsupported dtype {:?} (expected f32 or f64)",
                $op,
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    };
}
pub(crate) use dispatch;

/// Dispatches on a tensor's dtype.
macro_rules! dispatch_dtype {
    ($op:expr, $dt:expr, |$t:ident| $body:expr) => {
        match $dt {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            other => candle_core::bail!("{}: unsupported dtype {:?} (expected f32 or f64)", $op, other),
        }
    };
}
pub(crate) use dispatch_dtype;

/// Whether work over `n` independent samples should be split across threads by sample
/// (otherwise a single sample's work is parallelised internally).
pub(crate) fn par_over_samples(n: usize) -> bool {
    n >= rayon::current_num_threads()
}
