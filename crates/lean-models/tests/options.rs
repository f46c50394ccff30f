//! The one options type: what the registry refuses (naming the option and the model), the
//! serialised form checkpoints and exported configs store, and exported folders loaded back.
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lean_models::pretrained::{self, PretrainedConfig, PublishedMetrics};
use lean_models::{create_model, ModelOptions, ModelSpec};
use lean_ops::Stencil;

fn build_err(name: &str, o: ModelOptions) -> String {
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    match create_model(name, &o, vb) {
        Ok(_) => panic!("{name} with {o:?} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn options_a_model_does_not_support_are_refused_by_name() {
    let cases: Vec<(&str, ModelOptions, &[&str])> = vec![
        (
            "shufflenet_v2_x1_0",
            ModelOptions {
                features_only: true,
                ..Default::default()
            },
            &["shufflenet_v2_x1_0", "features_only"],
        ),
        (
            "mobilenet_v2",
            ModelOptions {
                dilate_last: Some(1),
                ..Default::default()
            },
            &["mobilenet_v2", "dilate_last"],
        ),
        (
            "shufflenet_v2_x0_5",
            ModelOptions {
                dilate_last: Some(1),
                ..Default::default()
            },
            &["shufflenet_v2_x0_5", "dilate_last"],
        ),
        (
            "resnet20",
            ModelOptions {
                stencil: Some(Stencil::Four),
                group_size: Some(2),
                ..Default::default()
            },
            &["resnet20", "stencil, group_size", "lean models only"],
        ),
        (
            "resnet18",
            ModelOptions {
                width: Some(0.5),
                ..Default::default()
            },
            &["resnet18", "width"],
        ),
        (
            "fpn_resnet20",
            ModelOptions {
                features_only: true,
                ..Default::default()
            },
            &["fpn_resnet20", "features_only"],
        ),
        (
            "fpn_resnet20",
            ModelOptions {
                group_size: Some(4),
                ..Default::default()
            },
            &["fpn_resnet20", "group_size", "lean models only"],
        ),
        (
            "lean_resnet20",
            ModelOptions {
                group_size: Some(0),
                ..Default::default()
            },
            &["lean_resnet20", "group_size must be at least 1"],
        ),
        (
            "mobilenet_v2",
            ModelOptions {
                width: Some(-1.0),
                ..Default::default()
            },
            &["mobilenet_v2", "width must be a positive number, got -1"],
        ),
        (
            "resnet20",
            ModelOptions {
                num_classes: Some(0),
                ..Default::default()
            },
            &["resnet20", "num_classes must be at least 1"],
        ),
    ];
    for (name, o, needles) in cases {
        let e = build_err(name, o);
        for n in needles {
            assert!(e.contains(n), "{name}: `{e}` lacks `{n}`");
        }
    }
}

#[test]
fn a_group_size_that_does_not_divide_the_channels_is_refused_with_layer_g_and_channels() {
    let e = build_err(
        "lean_resnet20",
        ModelOptions {
            group_size: Some(3),
            ..Default::default()
        },
    );
    // resnet20's first stage has 16 channels: g = 3 does not divide them.
    for n in ["lean_resnet20", "layer1.0.conv1", "group size 3", "16"] {
        assert!(e.contains(n), "`{e}` lacks `{n}`");
    }
    // A group size that divides every stage's channels builds.
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let o = ModelOptions {
        group_size: Some(4),
        ..Default::default()
    };
    create_model("lean_resnet20", &o, vb).unwrap();
}

#[test]
fn model_specs_serialise_flat_with_knobs_by_name_and_read_old_files() {
    let spec = ModelSpec {
        name: "lean_resnet18_cifar".into(),
        options: ModelOptions {
            num_classes: Some(10),
            stencil: Some(Stencil::Four),
            ..Default::default()
        },
    };
    let j = serde_json::to_value(&spec).unwrap();
    assert_eq!(j["name"], "lean_resnet18_cifar");
    assert_eq!(j["stencil"], "four");
    assert_eq!(j["num_classes"], 10);
    assert!(j.get("features_only").is_none() && j.get("dilate_last").is_none());
    let back: ModelSpec = serde_json::from_value(j).unwrap();
    assert_eq!(back, spec);
    // The form written before the options were one type (every key present, nulls).
    let old = r#"{"name":"lean_resnet18_cifar","num_classes":10,"in_channels":1,"width":null,
                  "stencil":null,"group_size":null,"dense_downsample":null}"#;
    let s: ModelSpec = serde_json::from_str(old).unwrap();
    assert_eq!(s.options.in_channels, Some(1));
    assert_eq!(s.options.stencil, None);
    let bad = r#"{"name":"lean_resnet20","stencil":"plus"}"#;
    let e = serde_json::from_str::<ModelSpec>(bad).unwrap_err().to_string();
    assert!(e.contains("plus"), "{e}");
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("lean-options-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn an_exported_folder_loads_back_to_the_same_model() {
    let dev = Device::Cpu;
    let spec = ModelSpec {
        name: "lean_resnet20".into(),
        options: ModelOptions {
            in_channels: Some(1),
            num_classes: Some(4),
            ..Default::default()
        },
    };
    let vm = VarMap::new();
    let model = spec.build(VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let tensors = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let config = PretrainedConfig {
        format: pretrained::FORMAT.into(),
        model: spec.clone(),
        data: pretrained::DataSpec {
            input_size: [1, 16, 16],
            mean: vec![0.5],
            std: vec![0.25],
            label_names: ["a", "b", "c", "d"].map(String::from).to_vec(),
            dataset: "synthetic".into(),
        },
        metrics: PublishedMetrics {
            split: "test".into(),
            samples: 8,
            loss: 1.0,
            top1: Some(50.0),
            top5: Some(100.0),
            ..Default::default()
        },
        params: 1,
        macs: 1,
        recipe: serde_json::json!({}),
    };
    let dir = tmp("export");
    pretrained::export(&dir, &config, &tensors, "").unwrap();
    // Exporting again over it replaces the folder whole.
    pretrained::export(&dir, &config, &tensors, "one epoch").unwrap();
    assert!(!dir.with_extension("partial").exists() && !dir.with_extension("old").exists());
    let card = std::fs::read_to_string(dir.join("README.md")).unwrap();
    assert!(
        card.contains("one epoch") && card.contains("| test top-1 | 50.00% |"),
        "{card}"
    );
    let (loaded, cfg) = pretrained::load(dir.to_str().unwrap(), &dev).unwrap();
    assert_eq!(cfg, config);
    let x = Tensor::rand(0f32, 1., (2, 1, 16, 16), &dev).unwrap();
    let x = cfg.normalize(&x).unwrap();
    let (a, b) = (
        model.forward_t(&x, false).unwrap(),
        loaded.forward_t(&x, false).unwrap(),
    );
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
    // Wrong input to normalize names the shapes.
    let e = cfg
        .normalize(&Tensor::zeros((2, 3, 4, 4), DType::F32, &dev).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("(N, 1, H, W)"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn broken_exported_folders_fail_naming_the_file() {
    let dev = Device::Cpu;
    let dir = tmp("broken");
    std::fs::create_dir_all(&dir).unwrap();
    let e = pretrained::load(dir.to_str().unwrap(), &dev).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
    std::fs::write(dir.join("config.json"), b"{\"format\": 3}").unwrap();
    let e = pretrained::load(dir.to_str().unwrap(), &dev).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("not an exported"), "{e}");
    let published = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/lean_resnet18_cifar/config.json"
    );
    std::fs::copy(published, dir.join("config.json")).unwrap();
    let e = pretrained::load(dir.to_str().unwrap(), &dev).unwrap_err().to_string();
    assert!(e.contains("model.safetensors") && e.contains("missing"), "{e}");
    std::fs::write(dir.join("model.safetensors"), b"garbage").unwrap();
    let e = pretrained::load(dir.to_str().unwrap(), &dev).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    let e = pretrained::load("hf-hub:no-slash", &dev).unwrap_err().to_string();
    assert!(e.contains("hf-hub:no-slash") && e.contains("ORG/REPO"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A value of each option that would be valid where supported.
fn with_option(o: lean_models::ModelOption) -> ModelOptions {
    use lean_models::ModelOption::*;
    let mut m = ModelOptions::default();
    match o {
        NumClasses => m.num_classes = Some(7),
        InChannels => m.in_channels = Some(1),
        Width => m.width = Some(1.0),
        Stencil => m.stencil = Some(lean_ops::Stencil::Four),
        GroupSize => m.group_size = Some(2),
        DenseDownsample => m.dense_downsample = Some(true),
        LeanInit => m.lean_init = Some(lean_ops::LeanInit::Fanout),
        DilateLast => m.dilate_last = Some(1),
        FeaturesOnly => m.features_only = true,
    }
    m
}

#[test]
fn the_registry_table_is_consistent_and_every_unsupported_option_is_refused() {
    let entries = lean_models::entries();
    let mut names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), entries.len(), "duplicate names");
    for e in entries {
        let info = lean_models::describe(&e.name).unwrap();
        assert_eq!(
            (info.family, info.segmentation),
            (e.family, e.segmentation),
            "{}",
            e.name
        );
        for o in lean_models::ModelOption::ALL {
            let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
            let r = create_model(&e.name, &with_option(o), vb);
            if e.supports.contains(&o) {
                // Supported options build (ShuffleNetV2's width of 1.0 included).
                r.unwrap_or_else(|err| panic!("{} with {}: {err}", e.name, o.name()));
            } else {
                let err = r
                    .err()
                    .unwrap_or_else(|| panic!("{} accepted {}", e.name, o.name()))
                    .to_string();
                assert!(err.contains(&e.name) && err.contains(o.name()), "{err}");
            }
        }
    }
}
