//! Verified data-set downloads for `cargo xtask fetch-data`.
//!
//! A download goes to `<file>.partial` beside its destination and is renamed only once its MD5
//! matches: a partial file never looks complete, and a rerun resumes it with an HTTP range
//! request (or restarts when the server ignores ranges). A checksum mismatch deletes only the
//! bad download and names it. Archives extract into a temporary folder that replaces the data
//! set's folder only when extraction completed.
#![forbid(unsafe_code)]

use anyhow::{anyhow, bail, Context, Result};
use md5::{Digest, Md5};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// A file to download and its checksums.
#[derive(Clone, Debug)]
pub struct RemoteFile {
    /// File name (as stored).
    pub name: String,
    /// Where to get it.
    pub url: String,
    /// MD5 of the file as downloaded.
    pub md5: String,
    /// MD5 of its gunzipped content, where known (re-compressed copies verify by it).
    pub content_md5: Option<String>,
}

/// How a data set is laid out once fetched.
#[derive(Clone, Debug)]
pub enum Layout {
    /// Files stored as they are in `DIR/<name>/` (the IDX sets).
    Files(Vec<RemoteFile>),
    /// A .tar.gz extracted into `DIR/<name>/`.
    TarGz(RemoteFile),
}

/// A data set that can be fetched.
#[derive(Clone, Debug)]
pub struct Source {
    /// Its name, also its folder under the data root.
    pub name: String,
    /// Its files.
    pub layout: Layout,
}

fn idx_files(base: &str, md5s: [&str; 4], content: Option<[&str; 4]>) -> Vec<RemoteFile> {
    let names = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ];
    (0..4)
        .map(|i| RemoteFile {
            name: names[i].into(),
            url: format!("{base}{}", names[i]),
            md5: md5s[i].into(),
            content_md5: content.map(|c| c[i].to_string()),
        })
        .collect()
}

fn tar_gz(url: &str, md5: &str) -> Layout {
    let name = url.rsplit('/').next().unwrap_or(url).to_string();
    Layout::TarGz(RemoteFile {
        name,
        url: url.into(),
        md5: md5.into(),
        content_md5: None,
    })
}

/// The canonical sources of each data set.
pub fn sources() -> Vec<Source> {
    let s = |name: &str, layout| Source {
        name: name.into(),
        layout,
    };
    vec![
        s(
            "fashion-mnist",
            Layout::Files(idx_files(
                "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                [
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                    "25c81989df183df01b3e8a0aad5dffbe",
                    "bef4ecab320f06d8554ea6380940ec79",
                    "bb300cfdad3c16e7a12a480ee83cd310",
                ],
                Some([
                    "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                    "9018921c3c673c538a1fc5bad174d6f9",
                    "8181f5470baa50b63fa0f6fddb340f0a",
                    "15d484375f8d13e6eb1aabb0c3f46965",
                ]),
            )),
        ),
        s(
            "mnist",
            Layout::Files(idx_files(
                "https://storage.googleapis.com/cvdf-datasets/mnist/",
                [
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "d53e105ee54ea40749a09fcbcd1e9432",
                    "9fb629c4189551a2d022fa330f9573f3",
                    "ec29112dd5afa0611ce80d1b7f02629c",
                ],
                None,
            )),
        ),
        s(
            "cifar10",
            tar_gz(
                "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                "c32a1d4ab5d03f1284b67883e8d87530",
            ),
        ),
        s(
            "cifar100",
            tar_gz(
                "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                "03b5dce01913d631647c71ecec9e9cb8",
            ),
        ),
        s(
            "stl10",
            tar_gz(
                "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
                "91f7769df0f17e558f3565bffb0c7dfb",
            ),
        ),
    ]
}

/// The source named `name`.
pub fn source(name: &str) -> Result<Source> {
    sources().into_iter().find(|s| s.name == name).ok_or_else(|| {
        let names: Vec<String> = sources().into_iter().map(|s| s.name).collect();
        anyhow!("unknown data set `{name}`: expected one of {}", names.join(", "))
    })
}

fn md5_of(reader: &mut dyn Read) -> Result<String> {
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Checks `path` against `f`'s checksums (the file's, or its gunzipped content's).
pub fn verify(path: &Path, f: &RemoteFile) -> Result<()> {
    let open = || File::open(path).with_context(|| format!("cannot read {}", path.display()));
    let got = md5_of(&mut open()?)?;
    if got == f.md5 {
        return Ok(());
    }
    if let Some(want) = &f.content_md5 {
        if let Ok(content) = md5_of(&mut flate2::read::GzDecoder::new(open()?)) {
            if &content == want {
                return Ok(());
            }
        }
    }
    bail!(
        "checksum mismatch for {}: expected md5 {}, got {got}",
        path.display(),
        f.md5
    )
}

fn partial_of(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// Downloads `f` to `dest` (resuming `dest.partial`), verifies it, and renames it into place.
pub fn download(f: &RemoteFile, dest: &Path) -> Result<()> {
    if dest.is_file() && verify(dest, f).is_ok() {
        return Ok(());
    }
    fs::create_dir_all(dest.parent().expect("a file path"))
        .with_context(|| format!("cannot create {}", dest.display()))?;
    let partial = partial_of(dest);
    let have = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut req = agent.get(&f.url);
    if have > 0 {
        req = req.header("Range", &format!("bytes={have}-"));
    }
    let mut resp = req.call().with_context(|| format!("cannot download {}", f.url))?;
    let status = resp.status().as_u16();
    let (mut out, start) = match status {
        206 => (fs::OpenOptions::new().append(true).open(&partial)?, have),
        200 => (
            File::create(&partial).with_context(|| format!("cannot write {}", partial.display()))?,
            0,
        ),
        416 if have > 0 => (fs::OpenOptions::new().append(true).open(&partial)?, have),
        s => bail!("cannot download {}: HTTP {s}", f.url),
    };
    let remaining: Option<u64> = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    if status != 416 {
        let bar = indicatif::ProgressBar::new(start + remaining.unwrap_or(0));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(f.name.clone());
        bar.set_position(start);
        let mut reader = resp.body_mut().as_reader();
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    out.flush()?;
                    bail!(
                        "download of {} broke off after {} bytes ({e}); run the command again to resume",
                        f.url,
                        start + got
                    );
                }
            };
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])?;
            got += n as u64;
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
        out.flush()?;
        if let Some(want) = remaining {
            if got < want {
                bail!(
                    "download of {} cut off at {} of {} bytes; run the command again to resume",
                    f.url,
                    start + got,
                    start + want
                );
            }
        }
    }
    drop(out);
    if let Err(e) = verify(&partial, f) {
        fs::remove_file(&partial).ok();
        return Err(e.context(format!(
            "{} was deleted; run the command again to download it afresh",
            partial.display()
        )));
    }
    fs::rename(&partial, dest).with_context(|| format!("cannot rename {} to {}", partial.display(), dest.display()))
}

/// Extracts a verified .tar.gz into `target`, replacing it only once extraction completed.
pub fn extract(archive: &Path, target: &Path) -> Result<()> {
    let tmp = partial_of(target);
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    let file = File::open(archive).with_context(|| format!("cannot read {}", archive.display()))?;
    tar::Archive::new(flate2::read::GzDecoder::new(file))
        .unpack(&tmp)
        .with_context(|| format!("cannot extract {}", archive.display()))?;
    if target.exists() {
        let old = target.with_extension("old");
        fs::rename(target, &old)?;
        fs::rename(&tmp, target)?;
        fs::remove_dir_all(&old)?;
    } else {
        fs::rename(&tmp, target)?;
    }
    Ok(())
}

/// Fetches `src` into `dir/<name>/`, from the network or (`from`) from local files: an
/// archive for the .tar.gz sets, a folder holding the files for the others.
pub fn fetch(src: &Source, dir: &Path, from: Option<&Path>) -> Result<PathBuf> {
    let target = dir.join(&src.name);
    match &src.layout {
        Layout::Files(files) => {
            for f in files {
                let dest = target.join(&f.name);
                match from {
                    Some(folder) => {
                        let given = folder.join(&f.name);
                        verify(&given, f)?;
                        if given.canonicalize().ok() != dest.canonicalize().ok() {
                            fs::create_dir_all(&target)?;
                            let partial = partial_of(&dest);
                            fs::copy(&given, &partial).with_context(|| format!("cannot copy {}", given.display()))?;
                            fs::rename(&partial, &dest)?;
                        }
                    }
                    None => download(f, &dest)?,
                }
            }
        }
        Layout::TarGz(f) => {
            let archive = match from {
                Some(a) => {
                    verify(a, f)?;
                    a.to_path_buf()
                }
                None => {
                    let a = dir.join(".downloads").join(&f.name);
                    download(f, &a)?;
                    a
                }
            };
            extract(&archive, &target)?;
        }
    }
    Ok(target)
}
