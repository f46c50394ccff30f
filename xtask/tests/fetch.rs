//! The download path end to end against a local HTTP server on 127.0.0.1 serving generated
//! archives: a good one, a corrupt one, one cut off midway (then resumed), and the offline
//! `--from` import.
use lean_test_support::http::Response;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use xtask::{fetch, Layout, RemoteFile, Source};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Good,
    /// Announce the full length, send half, close.
    CutOff,
}

#[derive(Default)]
struct Served {
    files: HashMap<String, (Vec<u8>, Option<Mode>)>,
    range_requests: usize,
}

/// A bounded local server (at most 40 connections): ranges `bytes=N-` are honoured and counted.
fn serve(state: Arc<Mutex<Served>>) -> String {
    lean_test_support::http::serve(40, move |req| {
        let mut st = state.lock().unwrap();
        let Some((body, mode)) = st.files.get(&req.path).cloned() else {
            return Response::not_found();
        };
        let (status, part) = match req.range {
            Some((from, _)) if from < body.len() => {
                st.range_requests += 1;
                ("206 Partial Content", body[from..].to_vec())
            }
            _ => ("200 OK", body),
        };
        Response {
            status: status.into(),
            truncate_to: (mode == Some(Mode::CutOff)).then_some(part.len() / 2),
            body: part,
            headers: vec![],
        }
    })
}

fn md5_hex(b: &[u8]) -> String {
    use md5::{Digest, Md5};
    format!("{:x}", Md5::digest(b))
}

/// A .tar.gz holding `cifar-10-batches-bin/test_batch.bin` with `content`.
fn archive(content: &[u8]) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    let mut h = tar::Header::new_gnu();
    h.set_size(content.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "cifar-10-batches-bin/test_batch.bin", content)
        .unwrap();
    tar.into_inner().unwrap().finish().unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tar_source(url: String, md5: String) -> Source {
    Source {
        name: "cifar10".into(),
        layout: Layout::TarGz(RemoteFile {
            name: "cifar-10-binary.tar.gz".into(),
            url,
            md5,
            content_md5: None,
        }),
    }
}

fn extracted(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("cifar10/cifar-10-batches-bin/test_batch.bin")).unwrap()
}

#[test]
fn downloads_verify_resume_and_never_lose_good_data() {
    let content: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let good = archive(&content);
    let state = Arc::new(Mutex::new(Served::default()));
    state
        .lock()
        .unwrap()
        .files
        .insert("/good.tar.gz".into(), (good.clone(), None));
    state
        .lock()
        .unwrap()
        .files
        .insert("/cut.tar.gz".into(), (good.clone(), Some(Mode::CutOff)));
    state
        .lock()
        .unwrap()
        .files
        .insert("/bad.tar.gz".into(), (archive(b"something else"), None));
    let base = serve(state.clone());
    let md5 = md5_hex(&good);

    // A good archive: downloaded, verified, extracted.
    let dir = tmp("good");
    fetch(&tar_source(format!("{base}/good.tar.gz"), md5.clone()), &dir, None).unwrap();
    assert_eq!(extracted(&dir), content);
    assert!(!dir.join(".downloads/cifar-10-binary.tar.gz.partial").exists());

    // Fetching again finds the verified archive and does not download it again.
    fetch(&tar_source(format!("{base}/bad.tar.gz"), md5.clone()), &dir, None).unwrap();
    // A corrupt download: a clear error naming the file; the good data extracted before stays.
    std::fs::remove_dir_all(dir.join(".downloads")).unwrap();
    let e = fetch(&tar_source(format!("{base}/bad.tar.gz"), md5.clone()), &dir, None).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("checksum mismatch") && msg.contains("cifar-10-binary.tar.gz"),
        "{msg}"
    );
    assert_eq!(extracted(&dir), content, "good data survives a bad download");
    assert!(
        !dir.join(".downloads/cifar-10-binary.tar.gz.partial").exists(),
        "the bad download is deleted"
    );

    // Cut off midway: an error, a .partial that does not look complete, then a resumed rerun.
    let dir = tmp("cut");
    let e = fetch(&tar_source(format!("{base}/cut.tar.gz"), md5.clone()), &dir, None).unwrap_err();
    assert!(format!("{e:#}").contains("resume"), "{e:#}");
    let partial = dir.join(".downloads/cifar-10-binary.tar.gz.partial");
    let have = std::fs::metadata(&partial).unwrap().len() as usize;
    assert!(have > 0 && have < good.len());
    assert!(
        !dir.join("cifar10").exists(),
        "nothing extracted from a partial download"
    );
    state.lock().unwrap().files.get_mut("/cut.tar.gz").unwrap().1 = Some(Mode::Good);
    fetch(&tar_source(format!("{base}/cut.tar.gz"), md5.clone()), &dir, None).unwrap();
    assert_eq!(
        state.lock().unwrap().range_requests,
        1,
        "the rerun resumed with a range request"
    );
    assert_eq!(extracted(&dir), content);
    assert!(!partial.exists());

    // A missing file on the server.
    let e = fetch(&tar_source(format!("{base}/nope.tar.gz"), md5), &tmp("404"), None).unwrap_err();
    assert!(format!("{e:#}").contains("HTTP 404"), "{e:#}");
}

#[test]
fn idx_files_and_the_offline_import() {
    let a = b"first file".to_vec();
    let b = b"second file".to_vec();
    let state = Arc::new(Mutex::new(Served::default()));
    state.lock().unwrap().files.insert("/a.gz".into(), (a.clone(), None));
    state
        .lock()
        .unwrap()
        .files
        .insert("/b.gz".into(), (b"tampered".to_vec(), None));
    let base = serve(state);
    let file = |name: &str, body: &[u8]| RemoteFile {
        name: name.into(),
        url: format!("{base}/{name}"),
        md5: md5_hex(body),
        content_md5: None,
    };
    let src = Source {
        name: "mnist".into(),
        layout: Layout::Files(vec![file("a.gz", &a), file("b.gz", &b)]),
    };
    let dir = tmp("idx");
    let e = fetch(&src, &dir, None).unwrap_err();
    assert!(format!("{e:#}").contains("b.gz.partial"), "{e:#}");
    assert_eq!(
        std::fs::read(dir.join("mnist/a.gz")).unwrap(),
        a,
        "the verified file is kept"
    );
    assert!(!dir.join("mnist/b.gz").exists());

    // --from a folder that holds the right files.
    let from = tmp("idx-from");
    std::fs::write(from.join("a.gz"), &a).unwrap();
    std::fs::write(from.join("b.gz"), &b).unwrap();
    fetch(&src, &dir, Some(&from)).unwrap();
    assert_eq!(std::fs::read(dir.join("mnist/b.gz")).unwrap(), b);

    // --from an archive.
    let content = b"offline".to_vec();
    let arch = archive(&content);
    let path = from.join("cifar-10-binary.tar.gz");
    std::fs::write(&path, &arch).unwrap();
    let out = tmp("from-archive");
    fetch(
        &tar_source("http://127.0.0.1:9/unused".into(), md5_hex(&arch)),
        &out,
        Some(&path),
    )
    .unwrap();
    assert_eq!(extracted(&out), content);
    let e = fetch(
        &tar_source("http://127.0.0.1:9/unused".into(), md5_hex(b"x")),
        &out,
        Some(&path),
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("checksum mismatch"));
    assert_eq!(extracted(&out), content);
}

#[test]
fn the_embedded_fashion_mnist_verifies_against_the_canonical_checksums() {
    let src = xtask::source("fashion-mnist").unwrap();
    let embedded = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../datasets/fashion-mnist");
    let Layout::Files(files) = &src.layout else {
        panic!("IDX set")
    };
    for f in files {
        xtask::verify(&embedded.join(&f.name), f).unwrap();
    }
    assert!(xtask::source("imagenet")
        .unwrap_err()
        .to_string()
        .contains("unknown data set `imagenet`"));
    let _ = Read::bytes(&b""[..]);
}
