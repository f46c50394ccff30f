//! Readers of the binary data-set formats: MNIST / Fashion-MNIST (IDX), CIFAR-10 / CIFAR-100
//! and STL-10. Each checks sizes and reports the file and what was expected.

use crate::dataset::ArrayDataset;
use crate::idx::read_idx;
use crate::{DataError, Result};
use std::path::{Path, PathBuf};

/// A train or test split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// The training split.
    Train,
    /// The test (or validation) split.
    Test,
}

impl Split {
    /// "train" or "test".
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

fn format_err(path: &Path, msg: impl Into<String>) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// `dir/name` or `dir/name.gz`, whichever exists.
fn idx_file(dir: &Path, name: &str) -> Result<PathBuf> {
    let plain = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    if plain.is_file() {
        Ok(plain)
    } else if gz.is_file() {
        Ok(gz)
    } else {
        Err(DataError::Missing {
            path: plain,
            hint: String::new(),
        })
    }
}

/// The Fashion-MNIST class names.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Reads MNIST or Fashion-MNIST from `dir` (`{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`).
pub fn read_mnist_like(dir: &Path, split: Split, classes: Vec<String>) -> Result<ArrayDataset> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let ip = idx_file(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let lp = idx_file(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let images = read_idx(&ip)?;
    let labels = read_idx(&lp)?;
    let [n, h, w] = images.dims[..] else {
        return Err(format_err(
            &ip,
            format!("expected 3 dimensions (N, H, W), found {:?}", images.dims),
        ));
    };
    if labels.dims != [n] {
        return Err(format_err(
            &lp,
            format!(
                "expected {n} labels to match {}, found dimensions {:?}",
                ip.display(),
                labels.dims
            ),
        ));
    }
    if let Some(bad) = labels.data.iter().find(|&&l| l as usize >= classes.len()) {
        return Err(format_err(
            &lp,
            format!("label {bad} is out of range for {} classes", classes.len()),
        ));
    }
    ArrayDataset::new(
        [1, h, w],
        images.data,
        labels.data.iter().map(|&l| l as u32).collect(),
        classes,
    )
}

fn class_names_file(path: &Path, n: usize) -> Vec<String> {
    let names: Vec<String> = std::fs::read_to_string(path)
        .map(|s| {
            s.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    if names.len() == n {
        names
    } else {
        (0..n).map(|i| format!("class_{i}")).collect()
    }
}

/// Reads CIFAR-10 (`cifar-10-batches-bin/`) from `dir`: records of 1 label byte + 3072 pixels.
pub fn read_cifar10(dir: &Path, split: Split) -> Result<ArrayDataset> {
    let base = dir.join("cifar-10-batches-bin");
    let files: Vec<PathBuf> = match split {
        Split::Train => (1..=5).map(|i| base.join(format!("data_batch_{i}.bin"))).collect(),
        Split::Test => vec![base.join("test_batch.bin")],
    };
    let classes = class_names_file(&base.join("batches.meta.txt"), 10);
    read_cifar_records(&files, 1, 0, 10, classes)
}

/// Reads CIFAR-100 (`cifar-100-binary/`) from `dir` with its 100 fine labels.
pub fn read_cifar100(dir: &Path, split: Split) -> Result<ArrayDataset> {
    let base = dir.join("cifar-100-binary");
    let file = base.join(if split == Split::Train { "train.bin" } else { "test.bin" });
    let classes = class_names_file(&base.join("fine_label_names.txt"), 100);
    read_cifar_records(&[file], 2, 1, 100, classes)
}

/// Records of `label_bytes` labels (the one used at `label_at`) and 3x32x32 pixels.
fn read_cifar_records(
    files: &[PathBuf],
    label_bytes: usize,
    label_at: usize,
    n_classes: usize,
    classes: Vec<String>,
) -> Result<ArrayDataset> {
    let rec = label_bytes + 3072;
    let (mut pixels, mut labels) = (vec![], vec![]);
    for f in files {
        if !f.is_file() {
            return Err(DataError::Missing {
                path: f.clone(),
                hint: String::new(),
            });
        }
        let b = read(f)?;
        if b.is_empty() || b.len() % rec != 0 {
            return Err(format_err(
                f,
                format!("expected a multiple of {rec}-byte records, found {} bytes", b.len()),
            ));
        }
        for r in b.chunks_exact(rec) {
            let l = r[label_at];
            if l as usize >= n_classes {
                return Err(format_err(
                    f,
                    format!("label {l} is out of range for {n_classes} classes"),
                ));
            }
            labels.push(l as u32);
            pixels.extend_from_slice(&r[label_bytes..]);
        }
    }
    ArrayDataset::new([3, 32, 32], pixels, labels, classes)
}

/// Reads STL-10 (`stl10_binary/`) from `dir`: 3x96x96 column-major images, labels 1..10.
pub fn read_stl10(dir: &Path, split: Split) -> Result<ArrayDataset> {
    let base = dir.join("stl10_binary");
    let (xp, yp) = match split {
        Split::Train => (base.join("train_X.bin"), base.join("train_y.bin")),
        Split::Test => (base.join("test_X.bin"), base.join("test_y.bin")),
    };
    for p in [&xp, &yp] {
        if !p.is_file() {
            return Err(DataError::Missing {
                path: p.clone(),
                hint: String::new(),
            });
        }
    }
    let (x, y) = (read(&xp)?, read(&yp)?);
    let per = 3 * 96 * 96;
    if x.len() != y.len() * per {
        return Err(format_err(
            &xp,
            format!(
                "expected {} bytes for the {} labels of {}, found {}",
                y.len() * per,
                y.len(),
                yp.display(),
                x.len()
            ),
        ));
    }
    let mut pixels = vec![0u8; x.len()];
    // Each plane is stored column-major: transpose H and W.
    for (src, dst) in x.chunks_exact(96 * 96).zip(pixels.chunks_exact_mut(96 * 96)) {
        for col in 0..96 {
            for row in 0..96 {
                dst[row * 96 + col] = src[col * 96 + row];
            }
        }
    }
    let labels = y
        .iter()
        .map(|&l| {
            if (1..=10).contains(&l) {
                Ok(l as u32 - 1)
            } else {
                Err(format_err(&yp, format!("label {l} is outside 1..=10")))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let classes = class_names_file(&base.join("class_names.txt"), 10);
    ArrayDataset::new([3, 96, 96], pixels, labels, classes)
}
