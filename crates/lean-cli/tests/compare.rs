//! `lean compare` on a tiny budget: the table, the CSV columns, the markdown and the plot.
use std::path::PathBuf;
use std::process::Command;

#[test]
fn compare_writes_the_table_csv_markdown_and_plot() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::env::temp_dir().join(format!("lean-compare-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let args = [
        "compare",
        "--models",
        "resnet20,lean_resnet20,mobilenet_v2_035_cifar",
        "--epochs",
        "1",
        "--limit-train",
        "128",
        "--limit-val",
        "64",
        "--reps",
        "1",
        "--output",
        out.to_str().unwrap(),
    ];
    let o = Command::new(env!("CARGO_BIN_EXE_lean"))
        .current_dir(&root)
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let csv = std::fs::read_to_string(out.join("compare.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "model,family,params,macs,latency_b1_ms,latency_b64_ms,train_samples_per_sec,top1"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(
        (rows[0][1], rows[1][1], rows[2][1]),
        ("resnet", "lean_resnet", "mobilenet_v2")
    );
    for r in &rows {
        for v in &r[2..] {
            assert!(v.parse::<f64>().unwrap() >= 0.0, "{r:?}");
        }
    }
    // The lean model is cheaper than its dense parent, in parameters and MACs.
    assert!(rows[1][2].parse::<u64>().unwrap() * 5 < rows[0][2].parse::<u64>().unwrap());
    assert!(rows[1][3].parse::<u64>().unwrap() * 5 < rows[0][3].parse::<u64>().unwrap());
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    assert!(
        md.contains("| lean_resnet20 |") && md.contains("label smoothing 0.1"),
        "{md}"
    );
    assert!(
        md.contains("mobilenet_v2_035_cifar has"),
        "the size rule is reported: {md}"
    );
    for plot in ["compare.png", "compare-latency.png"] {
        let png = image::open(out.join(plot)).unwrap();
        assert_eq!((png.width(), png.height()), (800, 500), "{plot}");
    }
    assert!(out.join("lean_resnet20/training_curves.png").is_file());
}

#[test]
fn compare_resume_trains_only_what_is_missing_and_refuses_another_recipe() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::env::temp_dir().join(format!("lean-compare-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = |epochs: &str, limit: &str, models: &str, resume: bool| {
        let mut args = vec![
            "compare",
            "--models",
            models,
            "--epochs",
            epochs,
            "--limit-train",
            limit,
            "--limit-val",
            "64",
            "--reps",
            "1",
            "--output",
            out.to_str().unwrap(),
        ];
        if resume {
            args.push("--resume");
        }
        Command::new(env!("CARGO_BIN_EXE_lean"))
            .current_dir(&root)
            .args(args)
            .output()
            .unwrap()
    };
    let epochs_of = |m: &str| {
        let csv = std::fs::read_to_string(out.join(m).join("summary.csv")).unwrap();
        csv.lines().count() - 1
    };
    let o = run("1", "128", "lean_resnet20", false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first = std::fs::read(out.join("lean_resnet20/last.safetensors")).unwrap();
    // One more epoch for the first model, a new second model.
    let o = run("2", "128", "lean_resnet20,resnet20", true);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("start_epoch=1"),
        "the first model continues from epoch 1: {log}"
    );
    assert_eq!((epochs_of("lean_resnet20"), epochs_of("resnet20")), (2, 2));
    assert_ne!(
        std::fs::read(out.join("lean_resnet20/last.safetensors")).unwrap(),
        first
    );
    // Finished: nothing trains again, the table is written again.
    let done = std::fs::read(out.join("resnet20/last.safetensors")).unwrap();
    let o = run("2", "128", "lean_resnet20,resnet20", true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(out.join("resnet20/last.safetensors")).unwrap(), done);
    assert_eq!(
        std::fs::read_to_string(out.join("compare.csv"))
            .unwrap()
            .lines()
            .count(),
        3
    );
    // Another recipe in the same folder is refused, naming what differs.
    for (epochs, limit, what) in [("2", "64", "limit_train"), ("1", "128", "epochs")] {
        let o = run(epochs, limit, "lean_resnet20", true);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{what}");
        assert!(err.contains("another recipe") && err.contains(what), "{what}: {err}");
    }
}
