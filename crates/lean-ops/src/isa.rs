//! Run-time instruction-set dispatch for the hot loops we own (stencil kernels, BatchNorm,
//! activations, pooling, elementwise passes).
//!
//! A library cannot rely on the build flags of the crate that uses it: with default flags an
//! x86-64 build targets SSE2 only. So every hot loop is compiled three times from one generic
//! body — for AVX-512 (F, BW, DQ, VL), for AVX2 + FMA, and portably — and [`active`] picks one at
//! run time from what the CPU reports (`is_x86_feature_detected!`), once per process. On other
//! architectures (aarch64: NEON is part of the baseline) the portable path is the only one.
//!
//! Tests and benchmarks can cap the choice with [`set_max_isa`] or the environment variable
//! `LEAN_OPS_ISA` (`portable`, `avx2`, `avx512`), so every path is exercised on the machine at
//! hand. All paths compute the same values up to floating-point reassociation inside the
//! compiler's vectorisation (none uses fused multiply-add implicitly: Rust does not contract).

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// An instruction-set level of the hot loops, from least to most capable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// The target's baseline (SSE2 on x86-64, NEON on aarch64).
    Portable,
    /// x86-64 with AVX2 and FMA (x86-64-v3).
    Avx2,
    /// x86-64 with AVX-512 F, BW, DQ and VL (x86-64-v4).
    Avx512,
}

impl Isa {
    /// Every level, least capable first.
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

    /// The name used by `LEAN_OPS_ISA` and in benchmark output.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    fn from_u8(v: u8) -> Isa {
        match v {
            0 => Isa::Portable,
            1 => Isa::Avx2,
            _ => Isa::Avx512,
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Isa {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Isa::ALL.into_iter().find(|i| i.name() == s).ok_or_else(|| {
            crate::error::config_err(
                "isa",
                format!("unknown instruction set `{s}` (expected portable, avx2 or avx512)"),
            )
        })
    }
}

/// The most capable level this CPU supports (detected once).
pub fn detected() -> Isa {
    static DETECTED: OnceLock<Isa> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl");
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx512 && avx2 {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// 255: no cap set by [`set_max_isa`] yet (then `LEAN_OPS_ISA` is read).
static CAP: AtomicU8 = AtomicU8::new(u8::MAX);

fn env_cap() -> Isa {
    static ENV: OnceLock<Isa> = OnceLock::new();
    *ENV.get_or_init(|| {
        std::env::var("LEAN_OPS_ISA")
            .ok()
            .and_then(|v| v.trim().to_ascii_lowercase().parse().ok())
            .unwrap_or(Isa::Avx512)
    })
}

/// The level the hot loops use now: the detected one, capped by [`set_max_isa`] or, if that was
/// never called, by `LEAN_OPS_ISA`.
#[inline]
pub fn active() -> Isa {
    let cap = match CAP.load(Ordering::Relaxed) {
        u8::MAX => env_cap(),
        v => Isa::from_u8(v),
    };
    detected().min(cap)
}

/// Caps the level the hot loops use (`None`: no cap, the detected level). Process-wide; meant
/// for tests and benchmarks that compare the paths.
pub fn set_max_isa(cap: Option<Isa>) {
    CAP.store(cap.map_or(Isa::Avx512 as u8, |c| c as u8), Ordering::Relaxed);
}

/// Runs `f` compiled with AVX-512 enabled. Call only through [`isa_dispatch!`], which checks
/// [`active`] first.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/DQ/VL, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
#[inline]
pub(crate) unsafe fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Runs `f` compiled with AVX2 and FMA enabled. Call only through [`isa_dispatch!`].
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
#[inline]
pub(crate) unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Evaluates `$body` compiled for the [`active`](crate::isa::active) instruction set. The body
/// should be a call of an `#[inline(always)]` function, so that the whole loop is compiled
/// inside the target-feature wrapper; the closure around it is `#[inline(always)]` too (left to
/// the inliner, a large body was emitted as a function of its own, compiled for the baseline
/// instruction set: correct, but the depthwise kernels then ran as SSE code).
macro_rules! isa_dispatch {
    ($body:expr) => {{
        match $crate::isa::active() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `active` returns Avx512 only when the CPU reports AVX-512 F/BW/DQ/VL,
            // AVX2 and FMA (`detected`), so the target features the wrapper enables exist.
            $crate::isa::Isa::Avx512 => unsafe {
                $crate::isa::run_avx512(
                    #[inline(always)]
                    || $body,
                )
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `active` returns Avx2 only when the CPU reports AVX2 and FMA.
            $crate::isa::Isa::Avx2 => unsafe {
                $crate::isa::run_avx2(
                    #[inline(always)]
                    || $body,
                )
            },
            _ => $body,
        }
    }};
}
pub(crate) use isa_dispatch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_limits_the_active_level_and_names_round_trip() {
        for isa in Isa::ALL {
            assert_eq!(isa.name().parse::<Isa>().unwrap(), isa);
        }
        assert!("sse9".parse::<Isa>().is_err());
        set_max_isa(Some(Isa::Portable));
        assert_eq!(active(), Isa::Portable);
        assert_eq!(isa_dispatch!(active()), Isa::Portable);
        set_max_isa(None);
        assert_eq!(active(), detected());
    }
}
