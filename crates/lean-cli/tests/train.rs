//! `lean train` / `lean eval` end to end: a short run, an interrupted (killed) and resumed run
//! that ends with exactly the weights of an uninterrupted one, and clear errors.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn lean() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lean"));
    c.current_dir(root());
    c
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lean-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

const ARGS: [&str; 14] = [
    "train",
    "--model",
    "lean_resnet20",
    "--epochs",
    "3",
    "--limit-train",
    "384",
    "--limit-val",
    "128",
    "--batch-size",
    "64",
    "--seed",
    "7",
    "--warmup-epochs=0.5",
];

fn run_ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
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

#[test]
fn killed_and_resumed_run_ends_with_the_same_weights() {
    let (a, b) = (tmp("a"), tmp("b"));
    run_ok(lean().args(ARGS).args(["--output", a.to_str().unwrap()]));
    let csv = std::fs::read_to_string(a.join("summary.csv")).unwrap();
    assert!(csv.starts_with("epoch,train_loss,eval_loss,eval_top1,eval_top5,lr"));
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(a.join("args.json").is_file() && a.join("best.safetensors").is_file());

    // Start the same run, kill it once its first checkpoint exists (it is then in epoch 2).
    let mut child = lean()
        .args(ARGS)
        .args(["--output", b.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    lean_test_support::wait_for_file(&mut child, &b.join("last.safetensors"));
    child.kill().unwrap();
    child.wait().unwrap();
    let before = std::fs::read_to_string(b.join("summary.csv")).unwrap();
    assert_eq!(before.lines().count(), 2, "killed during epoch 2: {before}");
    run_ok(lean().args(["train", "--resume", b.to_str().unwrap(), "--epochs", "3"]));
    assert_eq!(
        model_tensors(&a.join("last.safetensors")),
        model_tensors(&b.join("last.safetensors"))
    );
    assert_eq!(
        std::fs::read_to_string(b.join("summary.csv")).unwrap().lines().count(),
        4
    );

    // Evaluating the checkpoint reproduces the last epoch's top-1.
    let out = run_ok(lean().args([
        "eval",
        "--checkpoint",
        a.to_str().unwrap(),
        "--limit-val",
        "128",
        "--format",
        "json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let last: Vec<String> = csv.lines().last().unwrap().split(',').map(String::from).collect();
    assert!(
        (v["top1"].as_f64().unwrap() - last[3].parse::<f64>().unwrap()).abs() < 1e-3,
        "{v} vs {last:?}"
    );
    assert_eq!(v["samples"], 128);
}

#[test]
fn bad_training_input_fails_clearly() {
    let fail = |args: &[&str], needle: &str| {
        let out = lean().args(args).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    };
    fail(&["train", "--model", "resnet19", "--epochs", "1"], "unknown model");
    fail(
        &[
            "train",
            "--dataset",
            "cifar10",
            "--data-dir",
            "/nonexistent",
            "--epochs",
            "1",
        ],
        "cargo xtask fetch-data cifar10",
    );
    fail(&["train", "--opt", "lamb", "--epochs", "1"], "unknown optimizer `lamb`");
    fail(
        &["train", "--sched", "poly", "--epochs", "1"],
        "unknown schedule `poly`",
    );
    fail(
        &["train", "--resume", "/nonexistent/last.safetensors"],
        "/nonexistent/last.safetensors",
    );
    let junk = tmp("junk");
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::write(junk.join("last.safetensors"), b"not a checkpoint").unwrap();
    fail(&["train", "--resume", junk.to_str().unwrap()], "not a safetensors file");
    fail(&["eval", "--weights", "x.safetensors"], "--weights FILE needs --model");
}

#[test]
fn a_checkpoint_evaluates_from_any_directory_and_logs_are_plain_text() {
    let run = tmp("anywhere");
    let out = lean()
        .args([
            "train",
            "--model",
            "lean_resnet20",
            "--epochs",
            "1",
            "--limit-train",
            "128",
            "--limit-val",
            "64",
            "-b",
            "64",
            "--output",
            run.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // stderr is a pipe here, not a terminal: no colour escape sequences in the log.
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("epoch done"), "{log}");
    assert!(!log.contains('\u{1b}'), "ANSI escapes in a redirected log: {log:?}");
    let elsewhere = tmp("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_lean"));
    c.current_dir(&elsewhere).args([
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--limit-val",
        "64",
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&run_ok(&mut c)).unwrap();
    let csv = std::fs::read_to_string(run.join("summary.csv")).unwrap();
    let last: Vec<&str> = csv.lines().last().unwrap().split(',').collect();
    assert!(
        (v["top1"].as_f64().unwrap() - last[3].parse::<f64>().unwrap()).abs() < 1e-3,
        "{v} vs {last:?}"
    );
    // Resuming it as another model is refused, naming both.
    let out = lean()
        .args(["train", "--resume", run.to_str().unwrap(), "--model", "resnet20"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--model resnet20") && err.contains("lean_resnet20"),
        "{err}"
    );
}

#[test]
fn every_numeric_flag_refuses_values_that_cannot_train() {
    let cases: [(&[&str], &str); 12] = [
        (&["--epochs", "0"], "epochs must be at least 1"),
        (&["-b", "0"], "batch_size must be at least 1"),
        (&["--lr=-0.1"], "lr must be a positive number, got -0.1"),
        (&["--lr", "NaN"], "lr must be a positive number, got NaN"),
        (&["--momentum", "1.5"], "momentum must be in [0, 1), got 1.5"),
        (&["--weight-decay=-1"], "weight_decay must be a number >= 0, got -1"),
        (&["--warmup-epochs=-2"], "warmup_epochs must be a number >= 0"),
        (&["--smoothing", "1"], "label smoothing must be in [0, 1), got 1"),
        (&["--clip-grad", "0"], "clip_grad must be a positive number, got 0"),
        (&["--limit-train", "0"], "limit_train must be at least 1"),
        (
            &["--sched", "step", "--decay-rate", "0"],
            "decay_rate must be in (0, 1]",
        ),
        (&["--group-size", "3"], "group size 3 does not divide"),
    ];
    for (flags, needle) in cases {
        // Small limits (where the case does not set them), so that a value wrongly accepted
        // ends quickly instead of training for minutes.
        let mut base = vec!["train", "--limit-val", "64"];
        for (flag, v) in [("--limit-train", "64"), ("--epochs", "1")] {
            if !flags.contains(&flag) {
                base.extend([flag, v]);
            }
        }
        let out = lean()
            .args(base)
            .args(flags)
            .args(["--output", tmp("bad-flags").to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flags:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{flags:?}: {err}");
        assert!(!err.contains("panicked"), "{flags:?}: {err}");
    }
}
