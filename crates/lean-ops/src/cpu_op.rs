//! The scaffolding the CPU ops share. An op's kernel is written once, generic over the float
//! type, on contiguous f32/f64 slices; [`OnCpu`] turns it into the candle `CustomOp` (dtype
//! dispatch, slicing the storages, wrapping the output), and its backward stays the op's own.
//! Apply an op as `x.apply_op2(&w, OnCpu(MyOp { .. }))`.

use crate::real::{dispatch, slice, Real};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// A CPU op of one tensor.
pub(crate) trait CpuOp1: Send + Sync {
    /// The op's name in errors.
    fn name(&self) -> &'static str;
    /// The output and its shape from the input's contiguous data `s` (laid out as `l`).
    fn fwd<T: Real>(&self, s: &[T], l: &Layout) -> Result<(Vec<T>, Shape)>;
    /// The input's gradient (`CustomOp1::bwd`); by default the op has no backward.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, _gy: &Tensor) -> Result<Option<Tensor>> {
        Err(candle_core::Error::BackwardNotSupported { op: self.name() })
    }
}

/// A CPU op of two tensors of the same float type.
pub(crate) trait CpuOp2: Send + Sync {
    /// The op's name in errors.
    fn name(&self) -> &'static str;
    /// The output and its shape from the inputs' contiguous data.
    fn fwd<T: Real>(&self, s1: &[T], l1: &Layout, s2: &[T], l2: &Layout) -> Result<(Vec<T>, Shape)>;
    /// The inputs' gradients (`CustomOp2::bwd`).
    fn bwd(&self, _a: &Tensor, _b: &Tensor, _y: &Tensor, _gy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Err(candle_core::Error::BackwardNotSupported { op: self.name() })
    }
}

/// A CPU op of three tensors of the same float type.
pub(crate) trait CpuOp3: Send + Sync {
    /// The op's name in errors.
    fn name(&self) -> &'static str;
    /// The output and its shape from the inputs' contiguous data.
    #[allow(clippy::too_many_arguments)]
    fn fwd<T: Real>(
        &self,
        s1: &[T],
        l1: &Layout,
        s2: &[T],
        l2: &Layout,
        s3: &[T],
        l3: &Layout,
    ) -> Result<(Vec<T>, Shape)>;
    /// The inputs' gradients (`CustomOp3::bwd`).
    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _c: &Tensor,
        _y: &Tensor,
        _gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Err(candle_core::Error::BackwardNotSupported { op: self.name() })
    }
}

/// A [`CpuOp1`], [`CpuOp2`] or [`CpuOp3`] as a candle custom op.
pub(crate) struct OnCpu<O>(pub O);

fn storage<T: Real>(y: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(y)
}

impl<O: CpuOp1> CustomOp1 for OnCpu<O> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.0.name(), s, |T| {
            let (y, shape) = self.0.fwd(slice::<T>(s, l)?, l)?;
            Ok((storage(y), shape))
        })
    }
    fn bwd(&self, x: &Tensor, y: &Tensor, gy: &Tensor) -> Result<Option<Tensor>> {
        self.0.bwd(x, y, gy)
    }
}

impl<O: CpuOp2> CustomOp2 for OnCpu<O> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.0.name(), s1, |T| {
            let (y, shape) = self.0.fwd(slice::<T>(s1, l1)?, l1, slice::<T>(s2, l2)?, l2)?;
            Ok((storage(y), shape))
        })
    }
    fn bwd(&self, a: &Tensor, b: &Tensor, y: &Tensor, gy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.0.bwd(a, b, y, gy)
    }
}

impl<O: CpuOp3> CustomOp3 for OnCpu<O> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.0.name(), s1, |T| {
            let (a, b, c) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?, slice::<T>(s3, l3)?);
            let (y, shape) = self.0.fwd(a, l1, b, l2, c, l3)?;
            Ok((storage(y), shape))
        })
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.0.bwd(a, b, c, y, gy)
    }
}
