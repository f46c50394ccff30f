//! Segmentation through the CLI: train, eval (mIoU, pixel accuracy, per-class IoU), export,
//! and predict writing a colourised mask and an overlay beside the image.
use std::path::PathBuf;
use std::process::Command;

fn lean(args: &[&str]) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(env!("CARGO_BIN_EXE_lean"))
        .current_dir(root)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn segmentation_trains_evaluates_exports_and_predicts_masks() {
    let d = std::env::temp_dir().join(format!("lean-cli-seg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let (run, exp) = (d.join("run"), d.join("exp"));
    lean(&[
        "train",
        "--model",
        "lean_fpn_resnet20",
        "--dataset",
        "fashion-mnist-seg",
        "--epochs",
        "1",
        "--limit-train",
        "128",
        "--limit-val",
        "64",
        "--batch-size",
        "32",
        "--smoothing",
        "0",
        "--output",
        run.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&lean(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--limit-val",
        "64",
        "--format",
        "json",
    ]))
    .unwrap();
    for k in ["miou", "pixel_acc", "loss", "samples", "iou"] {
        assert!(v.get(k).is_some(), "{k} missing in {v}");
    }
    assert_eq!(v["iou"].as_object().unwrap().len(), 11);
    assert!(v["iou"]["background"].as_f64().unwrap() > 0.0);
    lean(&[
        "export",
        run.to_str().unwrap(),
        "--out",
        exp.to_str().unwrap(),
        "--limit-val",
        "64",
    ]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exp.join("config.json")).unwrap()).unwrap();
    assert!(cfg["metrics"]["miou"].as_f64().is_some(), "{}", cfg["metrics"]);
    let img = image::GrayImage::from_fn(64, 64, |x, y| {
        image::Luma([if (20..44).contains(&x) && (10..50).contains(&y) {
            200
        } else {
            0
        }])
    });
    let png = d.join("item.png");
    img.save(&png).unwrap();
    let text = lean(&[
        "predict",
        "--model",
        "lean_fpn_resnet20",
        "--weights",
        exp.to_str().unwrap(),
        png.to_str().unwrap(),
    ]);
    assert!(text.contains("item.mask.png"), "{text}");
    for f in ["item.mask.png", "item.overlay.png"] {
        let m = image::open(d.join(f)).unwrap();
        assert_eq!((m.width(), m.height()), (64, 64), "{f}");
    }
}
