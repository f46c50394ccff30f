//! `runtime::with_workers_awake`: the other threads of the pool poll for work while `f` runs.
//! What can go wrong is functional, not speed (docs/benchmarks.md has the timings): a wrong
//! result, a deadlock (the owner popping a helper job, nested calls, helpers on a busy pool),
//! a hang after a panic in `f`. Each case runs under a watchdog, so a hang fails the test.

use lean_ops::runtime::{in_pool, with_workers_awake};
use rayon::prelude::*;
use std::sync::mpsc;
use std::time::Duration;

/// Runs `f` on its own thread and fails if it does not finish within a minute.
fn within_a_minute<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{what}: did not finish within a minute (deadlock?)"))
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
}

/// A parallel computation with many small ops, as a small-batch forward is.
fn many_parallel_sums() -> u64 {
    (0..200u64)
        .map(|k| (0..10_000u64).into_par_iter().map(|i| i * k % 7).sum::<u64>())
        .sum()
}

#[test]
fn parallel_work_inside_gives_the_same_result_on_any_pool_size() {
    let expected: u64 = (0..200u64)
        .map(|k| (0..10_000u64).map(|i| i * k % 7).sum::<u64>())
        .sum();
    for threads in [1, 2, 4] {
        let got = within_a_minute("pool", move || {
            pool(threads).install(|| with_workers_awake(many_parallel_sums))
        });
        assert_eq!(got, expected, "{threads} threads");
    }
}

#[test]
fn outside_the_pool_and_inside_in_pool_both_work() {
    let expected = many_parallel_sums();
    assert_eq!(
        within_a_minute("outside", || with_workers_awake(many_parallel_sums)),
        expected
    );
    assert_eq!(
        within_a_minute("in_pool", || in_pool(|| with_workers_awake(many_parallel_sums))),
        expected
    );
}

#[test]
fn nested_calls_and_calls_from_parallel_tasks_do_not_deadlock() {
    let got = within_a_minute("nested", || {
        pool(2).install(|| {
            with_workers_awake(|| {
                let inner = with_workers_awake(many_parallel_sums);
                // Called from tasks that may run on a helping thread or on the owner.
                let from_tasks: Vec<u64> = (0..8)
                    .into_par_iter()
                    .map(|_| with_workers_awake(|| (0..1000u64).into_par_iter().sum::<u64>()))
                    .collect();
                (inner, from_tasks)
            })
        })
    });
    assert_eq!(got.0, many_parallel_sums());
    assert_eq!(got.1, vec![499_500; 8]);
}

#[test]
fn a_panic_in_f_propagates_and_releases_the_helpers() {
    let p = std::sync::Arc::new(pool(2));
    let q = p.clone();
    let caught = within_a_minute("panic", move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            q.install(|| {
                with_workers_awake(|| {
                    let _ = many_parallel_sums();
                    panic!("inside f");
                })
            })
        }))
    });
    assert!(caught.is_err(), "the panic must reach the caller");
    // The helpers stopped: the pool still runs new work.
    let after = within_a_minute("after panic", move || {
        p.install(|| with_workers_awake(many_parallel_sums))
    });
    assert_eq!(after, many_parallel_sums());
}
