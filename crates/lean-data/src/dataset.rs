//! Samples, the `Dataset` trait and the in-memory data set behind the fixed-size formats.

use crate::Result;

/// An image of `u8` pixels, channels first (C, H, W).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Channels.
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// C·H·W values, channel planes one after the other.
    pub data: Vec<u8>,
}

/// What a sample is labelled with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A class index.
    Class(u32),
    /// A per-pixel class map (H·W, row-major) for segmentation; 255 = ignore.
    Mask(Vec<u8>),
}

/// One image and its target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// The image.
    pub image: Image,
    /// Its label.
    pub target: Target,
}

/// The pixel value of segmentation masks that the loss and the metrics ignore.
pub const IGNORE_INDEX: u8 = 255;

/// A finite, indexable set of samples. Implementations are cheap to share across threads.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `i` (0 <= i < len).
    fn get(&self, i: usize) -> Result<Sample>;
    /// The class names, index = class id (for segmentation: 0 is the background).
    fn classes(&self) -> &[String];
    /// The image shape (C, H, W) when every image has the same one.
    fn image_shape(&self) -> Option<[usize; 3]>;
    /// The class of every sample, when known without decoding (classification sets).
    fn labels(&self) -> Option<&[u32]> {
        None
    }
}

/// Fixed-size images held in memory (the MNIST, CIFAR and STL-10 formats).
#[derive(Clone, Debug)]
pub struct ArrayDataset {
    shape: [usize; 3],
    pixels: Vec<u8>,
    labels: Vec<u32>,
    classes: Vec<String>,
}

impl ArrayDataset {
    /// `pixels` holds `labels.len()` images of `shape` (C, H, W), channels first; every label
    /// is below `classes.len()`.
    pub fn new(shape: [usize; 3], pixels: Vec<u8>, labels: Vec<u32>, classes: Vec<String>) -> Result<Self> {
        let per_image: usize = shape.iter().product();
        if per_image == 0 || pixels.len() != labels.len() * per_image {
            return Err(crate::DataError::Invalid(format!(
                "{} pixel values do not make {} images of shape {shape:?} ({per_image} values each)",
                pixels.len(),
                labels.len()
            )));
        }
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= classes.len()) {
            return Err(crate::DataError::Invalid(format!(
                "label {bad} is out of range for {} classes",
                classes.len()
            )));
        }
        Ok(ArrayDataset {
            shape,
            pixels,
            labels,
            classes,
        })
    }

    /// The first `n` samples (all if fewer).
    pub fn truncate(mut self, n: usize) -> Self {
        let n = n.min(self.labels.len());
        self.labels.truncate(n);
        self.pixels.truncate(n * self.shape.iter().product::<usize>());
        self
    }

    /// The raw pixels of image `i`.
    pub fn pixels(&self, i: usize) -> &[u8] {
        let per: usize = self.shape.iter().product();
        &self.pixels[i * per..(i + 1) * per]
    }
}

impl Dataset for ArrayDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn get(&self, i: usize) -> Result<Sample> {
        let [c, h, w] = self.shape;
        Ok(Sample {
            image: Image {
                c,
                h,
                w,
                data: self.pixels(i).to_vec(),
            },
            target: Target::Class(self.labels[i]),
        })
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn image_shape(&self) -> Option<[usize; 3]> {
        Some(self.shape)
    }
    fn labels(&self) -> Option<&[u32]> {
        Some(&self.labels)
    }
}

/// Per-class sample counts of a classification data set (decoding only if labels are unknown).
pub fn class_counts(ds: &dyn Dataset) -> Result<Vec<usize>> {
    let mut counts = vec![0; ds.classes().len()];
    let mut add = |l: u32| {
        if let Some(c) = counts.get_mut(l as usize) {
            *c += 1;
        }
    };
    match ds.labels() {
        Some(ls) => ls.iter().for_each(|l| add(*l)),
        None => {
            for i in 0..ds.len() {
                if let Target::Class(l) = ds.get(i)?.target {
                    add(l);
                }
            }
        }
    }
    Ok(counts)
}
