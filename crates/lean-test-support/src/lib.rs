//! Helpers shared by the workspace's test suites (a dev-dependency only):
//! - [`golden_dir`] / [`golden_file`]: the PyTorch reference files (docs/golden.md), skipped
//!   with a message where they are absent, as in a user's clone — but a failure under CI
//!   (`CI=true`), so a golden test can never pass vacuously there.
//! - [`program`]: an external program a test needs (e.g. `mpirun`), skipped with a message
//!   where it is not installed and a failure under CI.
//! - [`wait_for_file`]: polls until a running command has written a file (to stop it mid-run).
//! - [`http::serve`]: a bounded HTTP/1.1 server on 127.0.0.1 for download code (the data
//!   fetcher, the Hugging Face Hub client), with `Range` requests parsed.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::path::PathBuf;

/// Where the tests look for the PyTorch reference files: `$LEAN_GOLDEN_DIR` where set, else the
/// workspace's own `golden/` folder (ignored by git: `benches/pytorch/make_golden.py --out
/// golden` writes a set there). What the files hold and the tolerances are in docs/golden.md.
pub fn golden_root() -> PathBuf {
    match std::env::var_os("LEAN_GOLDEN_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../golden"),
    }
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The reference folder, or `None` (with a message on stderr) where it is absent.
///
/// # Panics
/// Under CI (`CI=true`) when the folder is absent.
pub fn golden_dir() -> Option<PathBuf> {
    golden_dir_at(golden_root(), under_ci())
}

fn golden_dir_at(d: PathBuf, ci: bool) -> Option<PathBuf> {
    if d.is_dir() {
        return Some(d);
    }
    assert!(
        !ci,
        "CI=true but the PyTorch reference folder {} is missing: the golden tests would pass vacuously",
        d.display()
    );
    eprintln!(
        "skipping: {} not found (the PyTorch references of docs/golden.md)",
        d.display()
    );
    None
}

/// One reference file, or `None` where the reference folder is absent.
///
/// # Panics
/// Under CI when the folder is absent, and anywhere when the folder exists without the file.
pub fn golden_file(name: &str) -> Option<PathBuf> {
    let f = golden_dir()?.join(name);
    assert!(f.is_file(), "reference file {} is missing", f.display());
    Some(f)
}

/// `name` if it is on PATH, or `None` (with a message on stderr) where it is not installed.
///
/// # Panics
/// Under CI (`CI=true`) when the program is missing: `.ci/run` installs what the tests need.
pub fn program(name: &str, install_hint: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()))
        .unwrap_or_default();
    if found.is_none() {
        assert!(!under_ci(), "CI=true but `{name}` is not installed ({install_hint})");
        eprintln!("skipping: `{name}` not found ({install_hint})");
    }
    found
}

/// Waits until `path` exists while `child` keeps running (checked every 20 ms, for at most
/// two minutes): the moment to stop a run mid-way, once its first checkpoint is written.
///
/// # Panics
/// When the time runs out, or the child ends first (it could then not be stopped mid-run).
pub fn wait_for_file(child: &mut std::process::Child, path: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !path.is_file() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        assert!(
            child.try_wait().expect("child status").is_none(),
            "the run ended before {} appeared",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

pub mod http {
    //! A bounded local HTTP server: serves at most `max_connections` requests, then (or after 60 s)
    //! stops; every connection is closed after one response.
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    /// A request, as far as the tests look at it.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Request {
        /// The path of the request line (`/a/b`).
        pub path: String,
        /// `Range: bytes=A-[B]` as (A, B).
        pub range: Option<(usize, Option<usize>)>,
    }

    /// A response.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Response {
        /// Status line after `HTTP/1.1`, e.g. `200 OK`.
        pub status: String,
        /// Extra headers (Content-Length and Connection are always sent).
        pub headers: Vec<(String, String)>,
        /// The body.
        pub body: Vec<u8>,
        /// Send only this many bytes of the body while announcing all of it (a cut-off transfer).
        pub truncate_to: Option<usize>,
    }

    impl Response {
        /// `404 Not Found`, empty.
        pub fn not_found() -> Self {
            Response {
                status: "404 Not Found".into(),
                ..Default::default()
            }
        }

        /// `200 OK` with `body`.
        pub fn ok(body: Vec<u8>) -> Self {
            Response {
                status: "200 OK".into(),
                body,
                ..Default::default()
            }
        }
    }

    fn parse_range(v: &str) -> Option<(usize, Option<usize>)> {
        let (a, b) = v.trim().split_once('-')?;
        Some((a.parse().ok()?, b.parse().ok()))
    }

    /// Starts the server; returns its base URL (`http://127.0.0.1:PORT`).
    pub fn serve(max_connections: usize, handler: impl Fn(&Request) -> Response + Send + 'static) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local address");
        listener.set_nonblocking(true).expect("non-blocking listener");
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut served = 0;
            while served < max_connections && Instant::now() < deadline {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                served += 1;
                if s.set_nonblocking(false).is_err() {
                    continue;
                }
                let Ok(clone) = s.try_clone() else { continue };
                let mut r = BufReader::new(clone);
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let mut req = Request {
                    path: line.split_whitespace().nth(1).unwrap_or("/").to_string(),
                    range: None,
                };
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        req.range = parse_range(v);
                    }
                }
                let resp = handler(&req);
                let mut head = format!(
                    "HTTP/1.1 {}\r\nContent-Length: {}\r\nConnection: close\r\n",
                    resp.status,
                    resp.body.len()
                );
                for (k, v) in &resp.headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let n = resp.truncate_to.unwrap_or(resp.body.len()).min(resp.body.len());
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&resp.body[..n]);
                let _ = s.flush();
            }
        });
        format!("http://{addr}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_reference_folder_skips_outside_ci() {
        assert_eq!(golden_dir_at(PathBuf::from("/nonexistent/golden"), false), None);
    }

    #[test]
    #[should_panic(expected = "CI=true but the PyTorch reference folder /nonexistent/golden is missing")]
    fn a_missing_reference_folder_fails_under_ci() {
        golden_dir_at(PathBuf::from("/nonexistent/golden"), true);
    }
}
