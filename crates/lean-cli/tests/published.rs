//! Every published model in models/ evaluates to the accuracy (top-1, or mIoU for segmentation)
//! its config.json states.
use std::path::PathBuf;
use std::process::Command;

#[test]
fn published_models_reproduce_their_stated_accuracy() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("models"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").is_file())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no published model in models/");
    for dir in dirs {
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let key = if cfg["metrics"].get("miou").is_some() {
            "miou"
        } else {
            "top1"
        };
        let stated = cfg["metrics"][key].as_f64().unwrap();
        let samples = cfg["metrics"]["samples"].as_u64().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_lean"))
            .current_dir(&root)
            .args([
                "eval",
                "--weights",
                dir.to_str().unwrap(),
                "--limit-val",
                &samples.to_string(),
                "--format",
                "json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["samples"].as_u64().unwrap(), samples, "{}", dir.display());
        let got = v[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{}: eval JSON has no `{key}`", dir.display()));
        // Within 0.01 points: the stated value was measured by an NCHW network, and the lean
        // ResNets now run channels-last inside, whose sums round differently (a handful of
        // pixels near a class boundary may flip; the model card states two decimals).
        assert!(
            (got - stated).abs() < 0.01,
            "{}: {key} {got} but config.json states {stated}",
            dir.display()
        );
        let card = std::fs::read_to_string(dir.join("README.md")).unwrap();
        assert!(
            card.contains(&format!("{stated:.2}%")),
            "{}: the model card states another accuracy",
            dir.display()
        );
        assert!(
            std::fs::metadata(dir.join("model.safetensors")).unwrap().len() < 10 << 20,
            "{} is over 10 MB",
            dir.display()
        );
    }
}
