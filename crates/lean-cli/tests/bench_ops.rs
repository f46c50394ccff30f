//! `lean bench ops`: the JSON schema and the error paths of the binary.
use std::process::Command;

fn lean(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lean"))
        .args(args)
        .output()
        .expect("run lean")
}

#[test]
fn bench_ops_json_has_one_object_per_case() {
    let out = lean(&["bench", "ops", "--format", "json", "--reps", "1", "--shapes", "2,8,9,9"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let cases = v.as_array().expect("an array");
    // 5 ops x 2 strides for the one shape.
    assert_eq!(cases.len(), 10);
    for c in cases {
        for key in ["op", "stencil", "group_size", "stride", "shape", "fwd_ms", "fwd_bwd_ms"] {
            assert!(c.get(key).is_some(), "missing {key} in {c}");
        }
        assert_eq!(c["shape"], serde_json::json!([2, 8, 9, 9]));
        assert!(c["fwd_ms"].as_f64().unwrap() > 0.0 && c["fwd_bwd_ms"].as_f64().unwrap() > 0.0);
    }
    let ops: Vec<&str> = cases.iter().map(|c| c["op"].as_str().unwrap()).collect();
    for op in ["lean", "lean_nhwc", "dense3x3", "grouped+1x1"] {
        assert!(ops.contains(&op), "{op} missing from {ops:?}");
    }
    let lean = cases.iter().find(|c| c["op"] == "lean").unwrap();
    assert_eq!(
        (lean["stencil"].as_str(), lean["group_size"].as_u64()),
        (Some("five"), Some(1))
    );
}

#[test]
fn bad_arguments_fail_with_a_clear_message() {
    let out = lean(&["bench", "nothing"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown model `nothing`"));
    let out = lean(&["bench", "ops", "resnet20"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be mixed"));
    let out = lean(&["bench", "ops", "--shapes", "1,2,3"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad shape `1,2,3`"));
    let out = lean(&["bench", "ops", "--format", "xml"]);
    assert!(!out.status.success());
    let out = lean(&["bench", "ops", "--device", "cuda"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("runs on the CPU only"));
    let out = lean(&["bench", "resnet20", "--device", "tpu"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--device `tpu`"));
}
