//! Atomic file writes, shared by everything in the workspace that saves (exported folders,
//! checkpoints, run summaries, plots): the bytes go to `<file>.partial` beside the target, which
//! is then renamed over it, so a reader never sees a half-written file and a failed write never
//! destroys the previous one.

use std::path::{Path, PathBuf};

/// The temporary path `write_atomic_with` writes before renaming (same folder, so the rename is
/// atomic; the extension kept last so format-sniffing writers still see it).
pub fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.rsplit_once('.') {
        Some((stem, ext)) => path.with_file_name(format!("{stem}.partial.{ext}")),
        None => path.with_file_name(format!("{name}.partial")),
    }
}

/// Calls `write(tmp)` to create the file at a temporary path, then renames it to `path`; on
/// failure the temporary file is removed and `path` is untouched. Errors name the file.
pub fn write_atomic_with<E: std::fmt::Display>(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), (PathBuf, String)> {
    let tmp = partial_path(path);
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err((tmp, e.to_string()));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        (path.to_path_buf(), e.to_string())
    })
}

/// Writes `bytes` to `path` atomically (see [`write_atomic_with`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> crate::Result<()> {
    write_atomic_with(path, |tmp| std::fs::write(tmp, bytes)).map_err(|(path, msg)| crate::Error::Io { path, msg })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_path_keeps_the_extension_last() {
        assert_eq!(partial_path(Path::new("a/b.png")), Path::new("a/b.partial.png"));
        assert_eq!(
            partial_path(Path::new("a/last.safetensors")),
            Path::new("a/last.partial.safetensors")
        );
        assert_eq!(partial_path(Path::new("a/args")), Path::new("a/args.partial"));
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("lean-fs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("x.json");
        write_atomic(&f, b"old").unwrap();
        let r = write_atomic_with(&f, |tmp| {
            std::fs::write(tmp, b"half")?;
            Err::<(), std::io::Error>(std::io::Error::other("disk full"))
        });
        let (path, msg) = r.unwrap_err();
        assert_eq!(path, partial_path(&f));
        assert!(msg.contains("disk full"));
        assert_eq!(std::fs::read(&f).unwrap(), b"old");
        assert!(!partial_path(&f).exists());
        write_atomic(&f, b"new").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"new");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
