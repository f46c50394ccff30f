//! Process-wide settings that make candle programs faster on CPU.

/// Tunes glibc's allocator for candle's large, short-lived temporaries.
///
/// With glibc's defaults every buffer above the dynamic mmap threshold (a few MB) is mapped and
/// unmapped on each op, and every page is faulted in again each time: backward passes run about
/// half as fast (docs/benchmarks.md, "The allocator"). Raising the mmap threshold to 32 MiB and the trim threshold to
/// 1 GiB keeps those buffers in the heap for reuse. One arena for all threads: glibc gives other
/// threads (rayon's, where [`in_pool`] runs a program) heaps of at most 64 MiB that it unmaps as
/// soon as they are empty, so their large buffers were page-faulted in again on every op; the
/// main heap is never trimmed below the threshold (threads allocate few, large buffers, so the
/// one lock costs nothing measurable). Call once at program start, before other threads
/// allocate. Returns whether the settings were applied (false off glibc).
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_ARENA_MAX: i32 = -8;
        // SAFETY: mallopt only changes allocator tuning parameters; it takes plain integers and
        // touches no memory of ours. glibc documents it as safe to call at any time.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
                && mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
                && mallopt(M_ARENA_MAX, 1) == 1
        }
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

/// Runs `f` on a thread of rayon's global pool (the one our kernels use) and returns its result.
///
/// Every kernel here splits its work with rayon. Called from a thread outside the pool (a
/// program's main thread), each parallel op hands its work to the pool and puts the caller to
/// sleep until it is done: two context switches per op, which at batch 1 (hundreds of ops of a
/// few microseconds each) cost more than the work. Inside the pool the calling thread takes part
/// in the work and waits by stealing, not sleeping. Wrap a whole inference or training loop in
/// it (`lean` runs every command this way). `f` must not block on work that only rayon tasks
/// would complete (it occupies one of the pool's threads).
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Runs `f` on a thread of rayon's pool (as [`in_pool`]) while the pool's other threads stay
/// awake, polling for work, instead of going to sleep between parallel ops.
///
/// A small-batch forward is hundreds of parallel ops of a few microseconds each, with serial
/// work between them; an idle rayon thread soon sleeps, and waking it costs more than its share
/// of an op, so at batch 1 a second thread made nothing faster (docs/benchmarks.md). OpenMP
/// (PyTorch) and ONNX Runtime keep their threads spinning for the same reason. Use it around a
/// latency-critical call (one inference, one training step), not around a whole program: the
/// other threads take a core each while `f` runs. They yield their core to the OS now and
/// then, so that other threads of the program (data loaders) still run. Nested calls, and
/// calls from a thread that is already helping, just run `f`.
pub fn with_workers_awake<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    // Polls between OS yields of an idle helper: about 50-100 µs of polling.
    const POLLS_PER_OS_YIELD: u32 = 1024;
    thread_local! {
        static HELPING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    /// Sets the flag when dropped, so the helpers stop also when `f` panics, and lets the
    /// calling thread spawn helpers again.
    struct Done<'a>(&'a AtomicBool);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
            HELPING.with(|h| h.set(false));
        }
    }
    if rayon::current_thread_index().is_none() {
        return in_pool(|| with_workers_awake(f));
    }
    let helpers = rayon::current_num_threads().saturating_sub(1);
    if helpers == 0 || HELPING.with(|h| h.get()) {
        return f();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        for _ in 0..helpers {
            let done = &done;
            s.spawn(move |_| {
                // The owner may pop a helper itself while it waits inside `f` (it is marked as
                // helping); a thread that already runs a helper leaves a second one to the others.
                if HELPING.with(|h| h.replace(true)) {
                    return;
                }
                let mut idle = 0u32;
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() == Some(rayon::Yield::Executed) {
                        idle = 0;
                    } else {
                        idle = idle.wrapping_add(1);
                        if idle.is_multiple_of(POLLS_PER_OS_YIELD) {
                            std::thread::yield_now();
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                }
                HELPING.with(|h| h.set(false));
            });
        }
        // The calling thread counts as helping while `f` runs: a call nested in `f`, or in a
        // task of `f` that runs on this thread, just runs its closure.
        HELPING.with(|h| h.set(true));
        let _done = Done(&done);
        f()
    })
}
