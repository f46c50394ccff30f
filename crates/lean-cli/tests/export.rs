//! `lean export` and loading the exported folder back: from disk, and from a Hugging Face Hub
//! endpoint on 127.0.0.1 (HF_ENDPOINT) through the hf-hub cache, online and offline.
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

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
/// reads (etag, x-repo-commit, content-range). At most 20 connections, gone after 60 s.
fn serve_hub(files: HashMap<String, Vec<u8>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut served = 0;
        while served < 20 && Instant::now() < deadline {
            let Ok((mut s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            served += 1;
            s.set_nonblocking(false).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut range: Option<(usize, Option<usize>)> = None;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = v.trim().split_once('-').unwrap();
                    range = Some((a.parse().unwrap(), b.parse().ok()));
                }
            }
            let Some(body) = files.get(&path) else {
                let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                continue;
            };
            let etag = format!("\"{:x}\"", body.len() * 7919 + path.len());
            let commit = "0123456789abcdef0123456789abcdef01234567";
            let (status, lo, hi) = match range {
                Some((a, b)) => (
                    "206 Partial Content",
                    a,
                    b.unwrap_or(body.len() - 1).min(body.len() - 1),
                ),
                None => ("200 OK", 0, body.len() - 1),
            };
            let part = &body[lo..=hi];
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {lo}-{hi}/{}\r\nETag: {etag}\r\nX-Repo-Commit: {commit}\r\nConnection: close\r\n\r\n",
                part.len(),
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(part);
        }
    });
    format!("http://{addr}")
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
