//! The data side of a run: limited splits, the augmentation recipes, and what a data set tells
//! the model (classes, input channels and size, normalisation) — resolved here, once.

use crate::{Error, Result};
use lean_data::transforms::Transform;
use lean_data::{dataset_info, open_dataset, Dataset, Pipeline, Sample, Split};
use lean_models::pretrained::DataSpec;
use lean_models::{describe, ModelSpec};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// The first `n` samples of a data set.
struct Subset {
    inner: Arc<dyn Dataset>,
    n: usize,
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.n
    }
    fn get(&self, i: usize) -> lean_data::Result<Sample> {
        self.inner.get(i)
    }
    fn classes(&self) -> &[String] {
        self.inner.classes()
    }
    fn image_shape(&self) -> Option<[usize; 3]> {
        self.inner.image_shape()
    }
    fn labels(&self) -> Option<&[u32]> {
        self.inner.labels().map(|l| &l[..self.n])
    }
}

/// Opens split `split` of the named data set, limited to `limit` samples.
pub fn open_limited(dataset: &str, data_dir: &Path, split: Split, limit: Option<usize>) -> Result<Arc<dyn Dataset>> {
    let ds = open_dataset(dataset, data_dir, split)?;
    Ok(match limit {
        Some(n) if n < ds.len() => Arc::new(Subset { inner: ds, n }),
        _ => ds,
    })
}

/// What a model trained on a data set needs to be rebuilt and fed without the data set:
/// recorded in every checkpoint, so `lean eval --checkpoint RUN` works from any directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataContext {
    /// The model with classes and input channels filled in from the data set.
    pub model: ModelSpec,
    /// Input size (the data set's, or the model's default for variable-size images),
    /// normalisation, class names, the data set's name.
    #[serde(flatten)]
    pub data: DataSpec,
    /// The data set's root, made absolute (so the checkpoint finds its data from any directory;
    /// as given where it could not be resolved).
    pub data_dir: std::path::PathBuf,
}

impl DataContext {
    /// Fills `spec`'s classes and input channels from `ds` (where unset) and records the rest.
    pub fn resolve(spec: &ModelSpec, dataset: &str, data_dir: &Path, ds: &dyn Dataset) -> Result<Self> {
        let info = dataset_info(dataset)?;
        let input_size = match ds.image_shape() {
            Some(s) => s,
            None => describe(&spec.name)?.input_size,
        };
        let mut model = spec.clone();
        let o = &mut model.options;
        o.num_classes = o.num_classes.or(Some(ds.classes().len()));
        o.in_channels = o.in_channels.or(Some(input_size[0]));
        Ok(DataContext {
            model,
            data: DataSpec {
                input_size,
                mean: info.mean,
                std: info.std,
                label_names: ds.classes().to_vec(),
                dataset: dataset.to_string(),
            },
            data_dir: std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf()),
        })
    }

    /// Checks that a data set is the task of the model (classification or segmentation).
    pub fn check_task(model: &str, dataset: &str) -> Result<()> {
        let seg_data = dataset_info(dataset)?.segmentation;
        if seg_data != describe(model)?.segmentation {
            let (d, m) = if seg_data {
                ("segmentation", "classification")
            } else {
                ("classification", "segmentation")
            };
            return Err(Error::Config(format!(
                "{dataset} is a {d} data set but {model} is a {m} model"
            )));
        }
        Ok(())
    }
}

/// The eval pipeline of a data set for a model: normalise (resizing and centre-cropping
/// variable-size images to the model's input size, as timm's eval transform).
pub fn eval_pipeline(dataset: &str, ds: &dyn Dataset, model: &str) -> Result<Pipeline> {
    let info = dataset_info(dataset)?;
    let mut steps = vec![];
    if ds.image_shape().is_none() {
        let [_, h, w] = describe(model)?.input_size;
        steps.push(Transform::ResizeCenterCrop {
            size: (h, w),
            crop_pct: 0.875,
        });
    }
    steps.push(Transform::Normalize {
        mean: info.mean,
        std: info.std,
    });
    Ok(Pipeline(steps))
}

/// The training pipeline: random crop (padding 1/8) + flip for fixed-size images, random
/// resized crop + flip for variable-size ones, then normalisation.
pub fn train_pipeline(dataset: &str, ds: &dyn Dataset, model: &str, augment: bool) -> Result<Pipeline> {
    let info = dataset_info(dataset)?;
    let mut steps = vec![];
    match ds.image_shape() {
        Some([_, h, w]) if augment => {
            steps.push(Transform::RandomCrop {
                size: (h, w),
                padding: h.max(w) / 8,
            });
            steps.push(Transform::HorizontalFlip { p: 0.5 });
        }
        Some(_) => {}
        None => {
            let [_, h, w] = describe(model)?.input_size;
            steps.push(Transform::RandomResizedCrop {
                size: (h, w),
                scale: (0.08, 1.0),
                ratio: (0.75, 4.0 / 3.0),
            });
            steps.push(Transform::HorizontalFlip { p: 0.5 });
        }
    }
    steps.push(Transform::Normalize {
        mean: info.mean,
        std: info.std,
    });
    Ok(Pipeline(steps))
}
