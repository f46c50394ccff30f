//! A short segmentation run on the Fashion-MNIST segmentation set clearly beats the
//! all-background baseline.
use lean_data::{open_dataset, Split, Target};
use lean_train::metrics::Confusion;
use lean_train::{train, ModelSpec, TrainConfig};
use std::path::PathBuf;

#[test]
fn short_segmentation_run_beats_the_all_background_baseline() {
    let data_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../datasets");
    let out = std::env::temp_dir().join(format!("lean-seg-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let cfg = TrainConfig {
        model: ModelSpec {
            name: "fpn_lean_resnet20".into(),
            ..Default::default()
        },
        dataset: "fashion-mnist-seg".into(),
        data_dir: data_dir.clone(),
        epochs: 2,
        batch_size: 32,
        lr: 0.05,
        warmup_epochs: 0.2,
        smoothing: 0.0,
        limit_train: Some(640),
        limit_val: Some(128),
        output: Some(out.clone()),
        ..Default::default()
    };
    let s = train(&cfg, None).unwrap();
    let last = s.history.last().unwrap();
    let miou = last.eval_miou.expect("segmentation rows carry mIoU");
    // The baseline: every pixel predicted background, scored on the same images.
    let val = open_dataset("fashion-mnist-seg", &data_dir, Split::Test).unwrap();
    let mut conf = Confusion::new(11);
    for i in 0..128 {
        let Target::Mask(m) = val.get(i).unwrap().target else {
            panic!("masks")
        };
        for t in m {
            conf.counts[t as usize * 11] += 1;
        }
    }
    let baseline = 100.0 * conf.miou();
    assert!(
        miou > 1.5 * baseline,
        "mIoU {miou:.2}% vs all-background {baseline:.2}%"
    );
    assert!(last.eval_pixel_acc.unwrap() > 100.0 * conf.pixel_accuracy() - 1.0);
    let csv = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    assert!(
        csv.starts_with("epoch,train_loss,eval_loss,eval_miou,eval_pixel_acc,lr"),
        "{csv}"
    );
}
