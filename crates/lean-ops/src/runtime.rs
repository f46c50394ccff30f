//! Process-wide settings that make candle programs faster on CPU.

/// Tunes glibc's allocator for candle's large, short-lived temporaries.
///
/// With glibc's defaults every buffer above the dynamic mmap threshold (a few MB) is mapped and
/// unmapped on each op, and every page is faulted in again each time: backward passes run about
/// half as fast (docs/benchmarks.md, "The allocator"). Raising the mmap threshold to 32 MiB and the trim threshold to
/// 1 GiB keeps those buffers in the heap for reuse. Call once at program start, before other
/// threads allocate. Returns whether the settings were applied (false off glibc).
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only changes allocator tuning parameters; it takes plain integers and
        // touches no memory of ours. glibc documents it as safe to call at any time.
        unsafe { mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" {
    fn mallopt(param: i32, value: i32) -> i32;
}
