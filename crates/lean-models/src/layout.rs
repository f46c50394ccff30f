//! Which memory layout the networks run in inside.

use std::sync::OnceLock;

/// Whether networks that can run channels-last inside do so by default: yes, unless the
/// environment variable `LEAN_LAYOUT` is `nchw` (read once; for A/B benchmarks and tests of the
/// NCHW path). Any other value than `nchw` or `nhwc` is ignored with a warning.
pub fn channels_last_default() -> bool {
    static DEFAULT: OnceLock<bool> = OnceLock::new();
    *DEFAULT.get_or_init(|| match std::env::var("LEAN_LAYOUT") {
        Ok(v) if v.eq_ignore_ascii_case("nchw") => false,
        Ok(v) if v.eq_ignore_ascii_case("nhwc") || v.is_empty() => true,
        Ok(v) => {
            tracing::warn!("LEAN_LAYOUT={v:?} is neither `nchw` nor `nhwc`; using the default (nhwc)");
            true
        }
        Err(_) => true,
    })
}
