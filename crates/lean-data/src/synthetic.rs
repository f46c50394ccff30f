//! A real-pixel segmentation set composed from Fashion-MNIST (as M2NIST is from MNIST): 1-3
//! items pasted onto a larger canvas, each item's pixels labelled with its class + 1, the rest
//! background (0). Deterministic: sample `i` depends only on the seed and `i`.

use crate::dataset::{ArrayDataset, Dataset, Image, Sample, Target};
use crate::Result;
use rand::{Rng, SeedableRng};

/// Fashion-MNIST items on a canvas, with per-pixel labels.
#[derive(Clone, Debug)]
pub struct PastedSegmentation {
    items: ArrayDataset,
    canvas: usize,
    len: usize,
    seed: u64,
    classes: Vec<String>,
}

/// Pixels of an item at or above this value belong to it.
const FOREGROUND: u8 = 32;

impl PastedSegmentation {
    /// `len` samples of `canvas` x `canvas` pixels built from the 28x28 grey `items`.
    pub fn new(items: ArrayDataset, canvas: usize, len: usize, seed: u64) -> Self {
        let mut classes = vec!["background".to_string()];
        classes.extend(items.classes().iter().cloned());
        PastedSegmentation {
            items,
            canvas: canvas.max(28),
            len,
            seed,
            classes,
        }
    }
}

impl Dataset for PastedSegmentation {
    fn len(&self) -> usize {
        self.len
    }
    fn get(&self, i: usize) -> Result<Sample> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(crate::mix_seed(self.seed, 0x5e9, i as u64));
        let c = self.canvas;
        let (mut img, mut mask) = (vec![0u8; c * c], vec![0u8; c * c]);
        let labels = self.items.labels().expect("array data sets know their labels");
        for _ in 0..rng.random_range(1..=3) {
            let k = rng.random_range(0..self.items.len());
            let (y0, x0) = (rng.random_range(0..=c - 28), rng.random_range(0..=c - 28));
            let px = self.items.pixels(k);
            for y in 0..28 {
                for x in 0..28 {
                    let v = px[y * 28 + x];
                    let at = (y0 + y) * c + x0 + x;
                    // Later items lie on top where they have ink.
                    if v >= FOREGROUND {
                        img[at] = v;
                        mask[at] = labels[k] as u8 + 1;
                    } else {
                        img[at] = img[at].max(v);
                    }
                }
            }
        }
        Ok(Sample {
            image: Image {
                c: 1,
                h: c,
                w: c,
                data: img,
            },
            target: Target::Mask(mask),
        })
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn image_shape(&self) -> Option<[usize; 3]> {
        Some([1, self.canvas, self.canvas])
    }
}
