//! The training configuration: typed values serialised as the names `args.json` always held,
//! old files still read, and every invalid value refused by name.
use lean_train::{DeviceSpec, OptimizerKind, ScheduleKind, TrainConfig};

#[test]
fn configs_serialise_by_name_and_read_the_recipes_of_published_models() {
    let cfg = TrainConfig {
        opt: OptimizerKind::AdamW,
        sched: ScheduleKind::MultiStep,
        decay_milestones: vec![3, 6],
        device: DeviceSpec::Cuda(1),
        ..Default::default()
    };
    let j = serde_json::to_value(&cfg).unwrap();
    assert_eq!(
        (j["opt"].as_str(), j["sched"].as_str()),
        (Some("adamw"), Some("multistep"))
    );
    assert_eq!(j["device"], "cuda:1");
    assert_eq!(j["model"]["name"], "lean_resnet20");
    assert_eq!(serde_json::from_value::<TrainConfig>(j).unwrap(), cfg);
    // The recipe stored in a published model's config.json (3 epochs of 40,000 images).
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/lean_resnet18_cifar/config.json"
    );
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let recipe: TrainConfig = serde_json::from_value(v["recipe"].clone()).unwrap();
    assert_eq!(recipe.opt, OptimizerKind::Sgd);
    assert_eq!(recipe.sched, ScheduleKind::Cosine);
    assert_eq!(recipe.device, DeviceSpec::Cpu);
    assert_eq!(
        (recipe.epochs, recipe.batch_size, recipe.limit_train),
        (3, 64, Some(40000))
    );
    let mut bad = v["recipe"].clone();
    bad["opt"] = "lamb".into();
    let e = serde_json::from_value::<TrainConfig>(bad).unwrap_err().to_string();
    assert!(e.contains("lamb"), "{e}");
}

#[test]
fn names_parse_both_ways_and_unknown_ones_list_the_choices() {
    for d in ["cpu", "cuda:0", "cuda:3", "metal"] {
        assert_eq!(d.parse::<DeviceSpec>().unwrap().to_string(), d);
    }
    assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
    let e = "tpu".parse::<DeviceSpec>().unwrap_err().to_string();
    assert!(e.contains("unknown device `tpu`") && e.contains("cuda:N"), "{e}");
    assert!("cuda:x"
        .parse::<DeviceSpec>()
        .unwrap_err()
        .to_string()
        .contains("cuda:N"));
    let e = "lamb".parse::<OptimizerKind>().unwrap_err().to_string();
    assert_eq!(e, "unknown optimizer `lamb` (expected sgd, adamw)");
    for s in ["cosine", "step", "multistep", "constant"] {
        assert_eq!(s.parse::<ScheduleKind>().unwrap().to_string(), s);
    }
}

#[test]
fn validation_names_each_bad_value() {
    type Edit = fn(&mut TrainConfig);
    let cases: [(Edit, &str); 10] = [
        (|c| c.epochs = 0, "epochs must be at least 1, got 0"),
        (|c| c.batch_size = 0, "batch_size must be at least 1"),
        (|c| c.lr = f64::INFINITY, "lr must be a positive number, got inf"),
        (
            |c| c.clip_grad = Some(-1.0),
            "clip_grad must be a positive number, got -1",
        ),
        (|c| c.min_lr = -1e-5, "min_lr must be a number >= 0"),
        (|c| c.momentum = -0.1, "momentum must be in [0, 1)"),
        (|c| c.limit_val = Some(0), "limit_val must be at least 1"),
        (
            |c| {
                c.sched = ScheduleKind::Step;
                c.decay_epochs = 0
            },
            "decay_epochs must be at least 1",
        ),
        (
            |c| c.sched = ScheduleKind::MultiStep,
            "the multistep schedule needs decay_milestones",
        ),
        (|c| c.model.name.clear(), "no model name given"),
    ];
    for (edit, needle) in cases {
        let mut c = TrainConfig::default();
        edit(&mut c);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(needle), "`{e}` lacks `{needle}`");
    }
    TrainConfig::default().validate().unwrap();
}

#[test]
fn a_recipe_written_before_the_stencil_and_sync_bn_options_still_reads() {
    // A published model's recipe as the November 2026 code wrote it: no `no_decay_stencil`, no
    // `sync_bn`; the options and device were plain strings then as now.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/recipe-before-sync-bn.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(v.get("sync_bn").is_none() && v.get("no_decay_stencil").is_none());
    let recipe: TrainConfig = serde_json::from_value(v).unwrap();
    assert_eq!(recipe.opt, OptimizerKind::Sgd);
    assert_eq!(recipe.sched, ScheduleKind::Cosine);
    assert_eq!(recipe.device, DeviceSpec::Cpu);
    assert_eq!(
        (recipe.epochs, recipe.batch_size, recipe.limit_train, recipe.seed),
        (3, 64, Some(15000), 42)
    );
    assert!(!recipe.sync_bn && !recipe.no_decay_stencil);
    assert_eq!(recipe.model.name, "lean_resnet18_cifar");
}
