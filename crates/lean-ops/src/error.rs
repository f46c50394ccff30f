//! Typed errors of the lean-ops crate.

/// What went wrong in a lean-ops operator or module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input tensor has the wrong rank, size or a shape that does not fit the op's configuration.
    #[error("{op}: {msg}")]
    Shape {
        /// The operator that rejected the input.
        op: &'static str,
        /// What was expected and what was found.
        msg: String,
    },
    /// The operator's configuration is invalid (group size, stride, stencil, ...).
    #[error("{op}: invalid configuration: {msg}")]
    Config {
        /// The operator whose configuration is invalid.
        op: &'static str,
        /// Which value is wrong and why.
        msg: String,
    },
    /// The fast CPU kernel does not handle this dtype (only f32 and f64 are supported).
    #[error("{op}: unsupported dtype {dtype:?} (expected f32 or f64)")]
    DType {
        /// The operator.
        op: &'static str,
        /// The dtype that was found.
        dtype: candle_core::DType,
    },
    /// A collective of a process group failed, or the ranks disagreed ([`crate::dist`]).
    #[error("collective: {0}")]
    Collective(String),
    /// An error raised by candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of lean-ops.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(c) => c,
            other => candle_core::Error::wrap(other),
        }
    }
}

pub(crate) fn shape_err(op: &'static str, msg: impl Into<String>) -> Error {
    Error::Shape { op, msg: msg.into() }
}

pub(crate) fn config_err(op: &'static str, msg: impl Into<String>) -> Error {
    Error::Config { op, msg: msg.into() }
}

/// Checks that `t` has rank 4 and returns its dims as (N, C, H, W).
pub(crate) fn dims4(op: &'static str, t: &candle_core::Tensor) -> Result<(usize, usize, usize, usize)> {
    match t.dims() {
        &[n, c, h, w] => Ok((n, c, h, w)),
        d => Err(shape_err(
            op,
            format!("expected a rank-4 (N, C, H, W) input, got shape {d:?}"),
        )),
    }
}

/// Checks that a float tensor is f32 or f64.
pub(crate) fn check_float(op: &'static str, t: &candle_core::Tensor) -> Result<()> {
    match t.dtype() {
        candle_core::DType::F32 | candle_core::DType::F64 => Ok(()),
        dtype => Err(Error::DType { op, dtype }),
    }
}

/// Checks that two operands of an elementwise op have the same shape and the same float dtype.
pub(crate) fn check_same_float(op: &'static str, a: &candle_core::Tensor, b: &candle_core::Tensor) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(shape_err(
            op,
            format!("operands differ in shape: {:?} and {:?}", a.dims(), b.dims()),
        ));
    }
    check_float(op, a)?;
    if a.dtype() != b.dtype() {
        return Err(shape_err(
            op,
            format!("operands differ in dtype: {:?} and {:?}", a.dtype(), b.dtype()),
        ));
    }
    Ok(())
}
