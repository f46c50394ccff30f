//! Data sets by name under one data root: `fashion-mnist`, `mnist`, `cifar10`, `cifar100`,
//! `stl10`, `imagefolder:<name>`, `segfolder:<name>`, and `fashion-mnist-seg` (the pasted
//! segmentation set built from Fashion-MNIST).

use crate::dataset::Dataset;
use crate::folder::{ImageFolder, SegmentationFolder};
use crate::formats::{read_cifar10, read_cifar100, read_mnist_like, read_stl10, Split, FASHION_MNIST_CLASSES};
use crate::synthetic::PastedSegmentation;
use crate::{DataError, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The data sets `cargo xtask fetch-data` can download.
pub const FETCHABLE: [&str; 5] = ["fashion-mnist", "mnist", "cifar10", "cifar100", "stl10"];

/// What a data set is: classification or segmentation, and its normalisation.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetInfo {
    /// The name it was opened by.
    pub name: String,
    /// Whether targets are masks.
    pub segmentation: bool,
    /// Per-channel mean of the training images (in [0, 1]).
    pub mean: Vec<f32>,
    /// Per-channel standard deviation.
    pub std: Vec<f32>,
}

/// The default data root: `datasets/` of the working directory.
pub fn default_data_dir() -> PathBuf {
    PathBuf::from("datasets")
}

/// Describes `name` without reading it.
pub fn dataset_info(name: &str) -> Result<DatasetInfo> {
    let (mean, std, seg): (&[f32], &[f32], bool) = match name {
        "fashion-mnist" => (&[0.2860], &[0.3530], false),
        "fashion-mnist-seg" => (&[0.1], &[0.25], true),
        "mnist" => (&[0.1307], &[0.3081], false),
        "cifar10" => (&[0.4914, 0.4822, 0.4465], &[0.2470, 0.2435, 0.2616], false),
        "cifar100" => (&[0.5071, 0.4865, 0.4409], &[0.2673, 0.2564, 0.2762], false),
        "stl10" => (&[0.4467, 0.4398, 0.4066], &[0.2603, 0.2566, 0.2713], false),
        n if n.starts_with("imagefolder:") => (&[0.485, 0.456, 0.406], &[0.229, 0.224, 0.225], false),
        n if n.starts_with("segfolder:") => (&[0.485, 0.456, 0.406], &[0.229, 0.224, 0.225], true),
        _ => return Err(DataError::UnknownDataset(name.to_string())),
    };
    Ok(DatasetInfo {
        name: name.to_string(),
        segmentation: seg,
        mean: mean.to_vec(),
        std: std.to_vec(),
    })
}

fn with_hint(e: DataError, name: &str, dir: &Path) -> DataError {
    match e {
        DataError::Missing { path, .. } => {
            let hint = if FETCHABLE.contains(&name) {
                format!("run `cargo xtask fetch-data {name} --dir {}`", dir.display())
            } else {
                format!(
                    "put the data set under {}",
                    dir.join(name.split(':').nth(1).unwrap_or(name)).display()
                )
            };
            DataError::Missing { path, hint }
        }
        other => other,
    }
}

/// Opens split `split` of data set `name` under `data_dir`.
pub fn open_dataset(name: &str, data_dir: &Path, split: Split) -> Result<Arc<dyn Dataset>> {
    dataset_info(name)?;
    let open = || -> Result<Arc<dyn Dataset>> {
        let fashion = || FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Ok(match name {
            "fashion-mnist" => Arc::new(read_mnist_like(&data_dir.join("fashion-mnist"), split, fashion())?),
            "mnist" => Arc::new(read_mnist_like(
                &data_dir.join("mnist"),
                split,
                (0..10).map(|d| d.to_string()).collect(),
            )?),
            "cifar10" => Arc::new(read_cifar10(&data_dir.join("cifar10"), split)?),
            "cifar100" => Arc::new(read_cifar100(&data_dir.join("cifar100"), split)?),
            "stl10" => Arc::new(read_stl10(&data_dir.join("stl10"), split)?),
            "fashion-mnist-seg" => {
                let items = read_mnist_like(&data_dir.join("fashion-mnist"), split, fashion())?;
                let (len, seed) = if split == Split::Train { (10_000, 1) } else { (2_000, 2) };
                Arc::new(PastedSegmentation::new(items, 64, len, seed))
            }
            n => {
                let (kind, sub) = n.split_once(':').expect("checked by dataset_info");
                let root = data_dir
                    .join(sub)
                    .join(if split == Split::Train { "train" } else { "val" });
                if !root.is_dir() {
                    return Err(DataError::Missing {
                        path: root,
                        hint: String::new(),
                    });
                }
                if kind == "imagefolder" {
                    Arc::new(ImageFolder::new(&root, 3)?)
                } else {
                    let names = data_dir.join(sub).join("classes.txt");
                    let classes: Vec<String> = std::fs::read_to_string(&names)
                        .map_err(|source| DataError::Io {
                            path: names.clone(),
                            source,
                        })?
                        .lines()
                        .map(|l| l.trim().to_string())
                        .filter(|l| !l.is_empty())
                        .collect();
                    Arc::new(SegmentationFolder::new(&root, classes, 3)?)
                }
            }
        })
    };
    open().map_err(|e| with_hint(e, name, data_dir))
}
