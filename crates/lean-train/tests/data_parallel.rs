//! Data-parallel training over ranks that are threads of this process (`ThreadGroup`): two
//! ranks with batches of 8 and SyncBN end where one process with batches of 16 ends.
//! The MPI engine is tested the same way across processes in lean-cli's tests/mpi.rs.

use lean_train::dist::{Collective, ThreadGroup};
use lean_train::{ModelSpec, TrainConfig, Trainer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lean-dp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn config(batch_size: usize, sync_bn: bool, output: &Path) -> TrainConfig {
    TrainConfig {
        model: ModelSpec::new("lean_resnet20"),
        data_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../datasets"),
        epochs: 1,
        batch_size,
        lr: 0.01,
        warmup_epochs: 0.0,
        limit_train: Some(96),
        limit_val: Some(50),
        workers: 0,
        seed: 11,
        sync_bn,
        output: Some(output.to_path_buf()),
        ..Default::default()
    }
}

/// The checkpoint's model tensors (BatchNorm counters left out), sorted by name.
fn weights(run: &Path) -> Vec<(String, Vec<f32>)> {
    let all = candle_core::safetensors::load(run.join("last.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mut v: Vec<_> = all
        .into_iter()
        .filter(|(k, _)| k.starts_with("model.") && !k.ends_with("num_batches_tracked"))
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The largest difference between two sets of tensors, relative to each tensor's largest value
/// (or to 1 where that is smaller: biases near zero would make any rounding look large).
fn max_rel_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> (f64, String) {
    assert_eq!(a.len(), b.len());
    let mut worst = (0.0, String::new());
    for ((name, x), (name2, y)) in a.iter().zip(b) {
        assert_eq!(name, name2);
        let scale = y.iter().fold(1f64, |m, v| m.max(v.abs() as f64));
        let d = x.iter().zip(y).fold(0f64, |m, (p, q)| m.max((p - q).abs() as f64)) / scale;
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    worst
}

fn two_ranks(sync_bn: bool, out: &Path) -> Vec<(f64, usize)> {
    let handles: Vec<_> = ThreadGroup::new(2)
        .into_iter()
        .map(|g| {
            let cfg = config(8, sync_bn, out);
            std::thread::spawn(move || {
                let t = Trainer::new_in_group(&cfg, None, g as Arc<dyn Collective>).unwrap();
                let s = t.run(&mut ()).unwrap();
                (s.best_top1, s.history[0].train_images_per_sec as usize)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn two_ranks_with_sync_bn_train_as_one_process_with_the_combined_batch() {
    let (one, two, two_plain) = (tmp("one"), tmp("two"), tmp("plain"));
    let single = Trainer::new(&config(16, false, &one), None)
        .unwrap()
        .run(&mut ())
        .unwrap();
    let ranks = two_ranks(true, &two);
    // Both ranks report the metrics of the whole evaluation set.
    assert_eq!(ranks[0].0, ranks[1].0);
    // Tolerance 1e-4: the same samples each step, summed in another order (per rank, then over
    // the ranks), so f32 rounding, ~1e-7 relative per sum, carried through 6 steps (measured:
    // 2e-7 here; up to 3e-5 with other seeds, as early training amplifies small differences).
    // Without SyncBN (each rank normalising over its 8 images) the weights move by ~8e-2. At a
    // larger learning rate (0.05) the amplification reaches 2e-3 after 6 steps, which is why
    // the test trains gently.
    let (d, name) = max_rel_diff(&weights(&two), &weights(&one));
    assert!(d < 1e-4, "2 ranks x 8 with SyncBN vs 1 x 16: {name} differs by {d:e}");
    assert!(
        (ranks[0].0 - single.best_top1).abs() < 2.1,
        "{} vs {}",
        ranks[0].0,
        single.best_top1
    );
    two_ranks(false, &two_plain);
    let (d_plain, _) = max_rel_diff(&weights(&two_plain), &weights(&one));
    assert!(d_plain > 1e-2, "without SyncBN the runs should differ, got {d_plain:e}");
    // A run of two ranks resumes only with two.
    let err = Trainer::new(&config(16, true, &two), Some(&two))
        .err()
        .expect("world size refused");
    assert!(err.to_string().contains("trained on 2 rank(s)"), "{err}");
}
