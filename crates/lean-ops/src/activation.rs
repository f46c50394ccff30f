//! Activations (ReLU, ReLU6) as one-pass ops with one-pass backward, the residual sum fused with
//! its activation, and the vectorised elementwise maps BatchNorm's kernels share.

use crate::cpu_op::{CpuOp1, CpuOp2, OnCpu};
use crate::error::{check_float, check_same_float, Result};
use crate::isa::isa_dispatch;
use crate::real::{dispatch_dtype, tensor, with_data, Real};
use candle_core::{Layout, Shape, Tensor};

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
pub(crate) fn relu<T: Real>(v: T) -> T {
    if v > T::zero() {
        v
    } else {
        T::zero()
    }
}

#[inline]
pub(crate) fn relu6<T: Real>(v: T) -> T {
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
            $crate::Activation::None => {
                let $f = |v| v;
                $body
            }
            $crate::Activation::Relu => {
                let $f = $crate::activation::relu;
                $body
            }
            $crate::Activation::Relu6 => {
                let $f = $crate::activation::relu6;
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
pub(crate) use with_act;

/// Elements per parallel task of the elementwise maps: large enough that rayon's per-task cost
/// vanishes, small enough to share a layer's tensor between the cores.
const MAP_CHUNK: usize = 1 << 14;

/// out[i] = f(a[i], b[i]) in parallel over fixed chunks; the plain inner loop vectorises
/// (a rayon map per element does not).
pub(crate) fn par_map2<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    assert_eq!(a.len(), b.len(), "par_map2: operand lengths");
    // Every value written: each chunk is zipped with the same range of a and b.
    crate::kernels::par_new(a.len(), MAP_CHUNK, |i, o| {
        let r = i..i + o.len();
        isa_dispatch!(map2_chunk(o, &a[r.clone()], &b[r], &f))
    })
}

#[inline(always)]
fn map2_chunk<T: Real>(out: &mut [std::mem::MaybeUninit<T>], a: &[T], b: &[T], f: &impl Fn(T, T) -> T) {
    for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
        o.write(f(*a, *b));
    }
}

/// g · act'(y) for the identity.
#[inline(always)]
pub(crate) fn identity_grad<T: Real>(g: T, _y: T) -> T {
    g
}

/// g · relu'(y), read off ReLU's output y (a select: loops over it vectorise).
#[inline(always)]
pub(crate) fn relu_grad<T: Real>(g: T, y: T) -> T {
    if y > T::zero() {
        g
    } else {
        T::zero()
    }
}

/// g · relu6'(y), read off ReLU6's output y.
#[inline(always)]
pub(crate) fn relu6_grad<T: Real>(g: T, y: T) -> T {
    if y > T::zero() && y < T::from_f64(6.0) {
        g
    } else {
        T::zero()
    }
}

/// Runs `body` with `d(g, y) = g · act'(y)` as a plain function (one branch-free loop per
/// activation, as [`with_act`]): kernels that read an activation's output gradient call it
/// on the fly instead of materialising gy · act'(y) first.
macro_rules! with_act_grad {
    ($act:expr, |$d:ident| $body:expr) => {
        match $act {
            $crate::Activation::None => {
                let $d = $crate::activation::identity_grad;
                $body
            }
            $crate::Activation::Relu => {
                let $d = $crate::activation::relu_grad;
                $body
            }
            $crate::Activation::Relu6 => {
                let $d = $crate::activation::relu6_grad;
                $body
            }
        }
    };
}
pub(crate) use with_act_grad;

/// gy · act'(y): the gradient before the activation, read off the activation's output.
pub(crate) fn pre_activation_grad<T: Real>(gy: &[T], y: &[T], act: Activation) -> Vec<T> {
    match act {
        Activation::None => gy.to_vec(),
        _ => with_act_grad!(act, |d| par_map2(gy, y, d)),
    }
}

/// act(x) elementwise.
pub(crate) fn activate<T: Real>(x: &[T], act: Activation) -> Vec<T> {
    with_act!(act, |f| par_map2(x, x, |v, _| f(v)))
}

struct ActOp(Activation);

impl CpuOp1 for ActOp {
    fn name(&self) -> &'static str {
        "activation"
    }
    fn fwd<T: Real>(&self, s: &[T], l: &Layout) -> candle_core::Result<(Vec<T>, Shape)> {
        let act = self.0;
        let y = activate(s, act);
        Ok((y, l.shape().clone()))
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
        Ok(x.contiguous()?.apply_op1(OnCpu(ActOp(act)))?)
    } else {
        act.apply_tensor(x)
    }
}

/// act(a + b): a residual sum and its activation in one pass.
struct AddActOp(Activation);

impl CpuOp2 for AddActOp {
    fn name(&self) -> &'static str {
        "add-activation"
    }
    fn fwd<T: Real>(&self, a: &[T], l1: &Layout, b: &[T], _l2: &Layout) -> candle_core::Result<(Vec<T>, Shape)> {
        let act = self.0;
        let y = with_act!(act, |f| par_map2(a, b, |x, y| f(x + y)));
        Ok((y, l1.shape().clone()))
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
        Ok(a.contiguous()?.apply_op2(&b.contiguous()?, OnCpu(AddActOp(act)))?)
    } else {
        #[cfg(feature = "cuda")]
        if a.device().is_cuda() && a.dims() == b.dims() {
            return crate::cuda::norm::add_activation(a, b, act);
        }
        act.apply_tensor(&(a + b)?)
    }
}
