//! `lean export` and loading the exported folder back: from disk, and from a Hugging Face Hub
//! endpoint on 127.0.0.1 (HF_ENDPOINT) through the hf-hub cache, online and offline.
use lean_test_support::http::Response;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn lean(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lean"));
    c.current_dir(root()).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lean-export-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A minimal hub: `GET /<repo>/resolve/main/<file>` with range support and the headers hf-hub
/// reads (etag, x-repo-commit, content-range).
fn serve_hub(files: HashMap<String, Vec<u8>>) -> String {
    lean_test_support::http::serve(20, move |req| {
        let Some(body) = files.get(&req.path) else {
            return Response::not_found();
        };
        let etag = format!("\"{:x}\"", body.len() * 7919 + req.path.len());
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let (status, lo, hi) = match req.range {
            Some((a, b)) => (
                "206 Partial Content",
                a,
                b.unwrap_or(body.len() - 1).min(body.len() - 1),
            ),
            None => ("200 OK", 0, body.len() - 1),
        };
        Response {
            status: status.into(),
            headers: vec![
                ("Content-Range".into(), format!("bytes {lo}-{hi}/{}", body.len())),
                ("ETag".into(), etag),
                ("X-Repo-Commit".into(), commit.into()),
            ],
            body: body[lo..=hi].to_vec(),
            truncate_to: None,
        }
    })
}

#[test]
fn exported_folders_evaluate_locally_and_from_the_hub() {
    let (run, out, cache) = (tmp("run"), tmp("out"), tmp("hf-home"));
    ok(lean(
        &[
            "train",
            "--model",
            "lean_resnet20",
            "--epochs",
            "1",
            "--limit-train",
            "256",
            "--limit-val",
            "64",
            "--batch-size",
            "64",
            "--output",
            run.to_str().unwrap(),
        ],
        &[],
    ));
    ok(lean(
        &["export", run.to_str().unwrap(), "--out", out.to_str().unwrap()],
        &[],
    ));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model"]["name"], "lean_resnet20");
    assert_eq!(cfg["dataset"], "fashion-mnist");
    assert_eq!(cfg["input_size"], serde_json::json!([1, 28, 28]));
    assert_eq!(cfg["label_names"][9], "Ankle boot");
    let top1 = cfg["metrics"]["top1"].as_f64().unwrap();
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains(&format!("{top1:.2}%")) && card.contains("## Recipe"),
        "{card}"
    );
    // The folder evaluates to the accuracy it records.
    let v: serde_json::Value = serde_json::from_str(&ok(lean(
        &["eval", "--weights", out.to_str().unwrap(), "--format", "json"],
        &[],
    )))
    .unwrap();
    assert!((v["top1"].as_f64().unwrap() - top1).abs() < 1e-9, "{v}");

    // The same folder from a local hub endpoint.
    let files: HashMap<String, Vec<u8>> = ["config.json", "model.safetensors"]
        .iter()
        .map(|f| {
            (
                format!("/lean/fmnist-test/resolve/main/{f}"),
                std::fs::read(out.join(f)).unwrap(),
            )
        })
        .collect();
    let endpoint = serve_hub(files);
    let hf_home = cache.to_str().unwrap();
    let args = [
        "eval",
        "--pretrained",
        "hf-hub:lean/fmnist-test",
        "--limit-val",
        "500",
        "--format",
        "json",
    ];
    let online: serde_json::Value =
        serde_json::from_str(&ok(lean(&args, &[("HF_ENDPOINT", &endpoint), ("HF_HOME", hf_home)]))).unwrap();
    let local: serde_json::Value = serde_json::from_str(&ok(lean(
        &[
            "eval",
            "--weights",
            out.to_str().unwrap(),
            "--limit-val",
            "500",
            "--format",
            "json",
        ],
        &[],
    )))
    .unwrap();
    assert_eq!(online["top1"], local["top1"]);
    // Offline: served from the cache, with the endpoint unreachable.
    let offline_env = [
        ("HF_ENDPOINT", "http://127.0.0.1:9"),
        ("HF_HOME", hf_home),
        ("HF_HUB_OFFLINE", "1"),
    ];
    let offline: serde_json::Value = serde_json::from_str(&ok(lean(&args, &offline_env))).unwrap();
    assert_eq!(offline["top1"], local["top1"]);
    // Offline with an empty cache, and a bad spec: clear errors.
    let empty = tmp("empty-cache");
    let out = lean(&args, &[("HF_HOME", empty.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the Hugging Face cache"));
    let out = lean(&["eval", "--pretrained", "lean/fmnist-test"], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected hf-hub:ORG/REPO"));
}
