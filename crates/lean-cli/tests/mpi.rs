//! `mpirun -np 2 lean train --dist mpi` (feature `mpi`; Open MPI's mpirun): two ranks of one
//! thread each with SyncBN end with the weights of one process with the combined batch, and a
//! killed-and-resumed 2-rank run ends exactly as the uninterrupted one.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lean-mpi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `lean` alone, with `threads` compute threads.
fn lean(threads: usize) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lean"));
    c.current_dir(root()).env("RAYON_NUM_THREADS", threads.to_string());
    c
}

/// `mpirun -np ranks lean ...`, one thread per rank; None where mpirun is not installed.
fn mpirun(ranks: usize) -> Option<Command> {
    let mpirun = lean_test_support::program("mpirun", "apt-get install openmpi-bin libopenmpi-dev")?;
    let mut c = Command::new(mpirun);
    c.current_dir(root()).args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &ranks.to_string(),
        "-x",
        "RAYON_NUM_THREADS=1",
        env!("CARGO_BIN_EXE_lean"),
    ]);
    Some(c)
}

fn run_ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn model_tensors(ck: &Path) -> Vec<(String, Vec<f32>)> {
    let all = candle_core::safetensors::load(ck, &candle_core::Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = all
        .into_iter()
        .filter(|(k, _)| k.starts_with("model.") && !k.ends_with("num_batches_tracked"))
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

const TRAIN: [&str; 16] = [
    "train",
    "--model",
    "lean_resnet20",
    "--limit-val",
    "64",
    "--seed",
    "5",
    "--lr",
    "0.01",
    "--warmup-epochs=0",
    "-j",
    "0",
    "--limit-train",
    "96",
    "--epochs",
    "1",
];

#[test]
fn two_ranks_with_sync_bn_end_with_the_weights_of_one_process_with_the_combined_batch() {
    let Some(mut two) = mpirun(2) else { return };
    let (a, b) = (tmp("one"), tmp("two"));
    run_ok(lean(1).args(TRAIN).args(["-b", "16", "--output", a.to_str().unwrap()]));
    let out = run_ok(
        two.args(TRAIN)
            .args(["--dist", "mpi", "--sync-bn", "-b", "8", "--output", b.to_str().unwrap()]),
    );
    assert_eq!(out.matches("run folder").count(), 1, "rank 0 alone reports: {out}");
    let (x, y) = (
        model_tensors(&a.join("last.safetensors")),
        model_tensors(&b.join("last.safetensors")),
    );
    assert_eq!(x.len(), y.len());
    // Tolerance 1e-3 of each tensor's scale: the same 16 images each step, summed per rank and
    // then over the ranks instead of in one pass, so f32 rounding (~1e-7) that the first steps
    // of training amplify, by an amount that depends on the seed and on the GEMM kernels the
    // CPU gets (measured after 6 steps: 1.5e-7 with seed 11, 2.8e-5 with this seed on an AVX2
    // machine, 1.25e-4 in the stem's weight on an AVX-512 one, with the same code). A real
    // fault is far larger: without SyncBN the weights differ by ~1e-1 (lean-train's
    // tests/data_parallel.rs checks that control).
    for ((name, p), (_, q)) in x.iter().zip(&y) {
        let scale = q.iter().fold(1f32, |m, v| m.max(v.abs()));
        let d = p.iter().zip(q).fold(0f32, |m, (u, v)| m.max((u - v).abs())) / scale;
        assert!(d < 1e-3, "{name}: 2 ranks x 8 vs 1 x 16 differ by {d:e}");
    }
    // Every rank evaluated its shard; the reported metrics are the whole set's.
    let csv = |d: &Path| std::fs::read_to_string(d.join("summary.csv")).unwrap();
    let top1 = |s: String| s.lines().nth(1).unwrap().split(',').nth(3).unwrap().to_string();
    assert_eq!(top1(csv(&a)), top1(csv(&b)));
}

#[test]
fn a_killed_and_resumed_two_rank_run_ends_as_the_uninterrupted_one() {
    let (Some(mut whole), Some(mut killed), Some(mut resumed)) = (mpirun(2), mpirun(2), mpirun(2)) else {
        return;
    };
    let (a, b) = (tmp("whole"), tmp("killed"));
    let args = [
        "train",
        "--dist",
        "mpi",
        "--model",
        "lean_resnet20",
        "--epochs",
        "3",
        "--limit-train",
        "1536",
        "--limit-val",
        "64",
        "--batch-size",
        "32",
        "--seed",
        "9",
        "--warmup-epochs=0.5",
        "-j",
        "0",
    ];
    run_ok(whole.args(args).args(["--output", a.to_str().unwrap()]));
    assert_eq!(
        std::fs::read_to_string(a.join("summary.csv")).unwrap().lines().count(),
        4
    );

    // The same run, stopped once its first checkpoint exists (it is then in epoch 2). SIGTERM
    // to mpirun, which takes its ranks down with it. The epochs are ~2 s each so that the
    // signal lands well before the end (at 0.5 s an epoch the ranks sometimes finished all 3).
    let mut child = killed
        .args(args)
        .args(["--output", b.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    lean_test_support::wait_for_file(&mut child, &b.join("last.safetensors"));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    // mpirun takes a moment to bring its ranks down: they may finish epoch 2, not epoch 3.
    let before = std::fs::read_to_string(b.join("summary.csv")).unwrap();
    assert!(
        matches!(before.lines().count(), 2 | 3),
        "stopped before the end: {before}"
    );

    // Resuming on one rank is refused; on two it ends with the uninterrupted run's weights.
    let out = lean(2)
        .args(["train", "--resume", b.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("trained on 2 rank(s)"), "{err}");
    run_ok(resumed.args([
        "train",
        "--dist",
        "mpi",
        "--resume",
        b.to_str().unwrap(),
        "--epochs",
        "3",
    ]));
    assert_eq!(
        model_tensors(&a.join("last.safetensors")),
        model_tensors(&b.join("last.safetensors"))
    );
    assert_eq!(
        std::fs::read_to_string(a.join("summary.csv"))
            .unwrap()
            .lines()
            .map(|l| l.split(',').take(5).collect::<Vec<_>>())
            .collect::<Vec<_>>(),
        std::fs::read_to_string(b.join("summary.csv"))
            .unwrap()
            .lines()
            .map(|l| l.split(',').take(5).collect::<Vec<_>>())
            .collect::<Vec<_>>(),
    );
}

#[test]
fn a_launch_without_dist_is_refused() {
    let Some(mut c) = mpirun(2) else { return };
    let out = c
        .args(["train", "--epochs", "1", "--limit-train", "64"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("add --dist mpi"), "{err}");
}
