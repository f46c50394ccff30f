//! Augmentation and preprocessing on float images, applied jointly to segmentation masks
//! where geometric (crops, flips, resizes; masks resample by nearest neighbour).

use crate::dataset::{Image, Sample, Target, IGNORE_INDEX};
use rand::{Rng, RngCore};

/// A float image (C, H, W), values in [0, 1] before normalisation.
#[derive(Clone, Debug, PartialEq)]
pub struct FImage {
    /// Channels.
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// C·H·W values, channel planes one after the other.
    pub data: Vec<f32>,
}

impl FImage {
    /// Pixels scaled to [0, 1].
    pub fn from_u8(img: &Image) -> Self {
        FImage {
            c: img.c,
            h: img.h,
            w: img.w,
            data: img.data.iter().map(|&v| v as f32 / 255.0).collect(),
        }
    }
}

/// A sample in flight through a pipeline: the image and, for segmentation, its mask.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    /// The image.
    pub image: FImage,
    /// The mask (H·W), when segmenting.
    pub mask: Option<Vec<u8>>,
    /// The class, when classifying.
    pub class: Option<u32>,
}

/// One step of a pipeline.
#[derive(Clone, Debug, PartialEq)]
pub enum Transform {
    /// Zero-pad by `padding` on every side, then crop `size` (h, w) at a random place.
    RandomCrop {
        /// Output (h, w).
        size: (usize, usize),
        /// Padding on each side.
        padding: usize,
    },
    /// Mirror left-right with probability `p`.
    HorizontalFlip {
        /// Probability.
        p: f64,
    },
    /// torchvision's RandomResizedCrop: a random area fraction in `scale` and aspect ratio in
    /// `ratio` (log-uniform), resized to `size`.
    RandomResizedCrop {
        /// Output (h, w).
        size: (usize, usize),
        /// Area fraction range.
        scale: (f64, f64),
        /// Aspect ratio (w/h) range.
        ratio: (f64, f64),
    },
    /// Evaluation: resize the shorter side to size / crop_pct, then centre-crop `size` (timm).
    ResizeCenterCrop {
        /// Output (h, w).
        size: (usize, usize),
        /// Fraction of the resized image kept (timm's crop_pct; 1.0 = no margin).
        crop_pct: f64,
    },
    /// Resize to exactly (h, w).
    Resize {
        /// Output (h, w).
        size: (usize, usize),
    },
    /// (x - mean[c]) / std[c]; a single value applies to every channel.
    Normalize {
        /// Per-channel means.
        mean: Vec<f32>,
        /// Per-channel standard deviations.
        std: Vec<f32>,
    },
    /// Random erasing / cutout: with probability `p`, a rectangle of area fraction in `scale`
    /// and aspect ratio in `ratio` is set to 0 (image only).
    RandomErasing {
        /// Probability.
        p: f64,
        /// Area fraction range.
        scale: (f64, f64),
        /// Aspect ratio range.
        ratio: (f64, f64),
    },
}

/// Crops `(y0, x0, h, w)` out of one plane of `pw` columns, filling outside with `fill`.
fn crop_plane<T: Copy>(
    src: &[T],
    ph: usize,
    pw: usize,
    (y0, x0, h, w): (isize, isize, usize, usize),
    fill: T,
) -> Vec<T> {
    let mut out = vec![fill; h * w];
    for y in 0..h {
        let sy = y0 + y as isize;
        if sy < 0 || sy >= ph as isize {
            continue;
        }
        for x in 0..w {
            let sx = x0 + x as isize;
            if sx >= 0 && sx < pw as isize {
                out[y * w + x] = src[sy as usize * pw + sx as usize];
            }
        }
    }
    out
}

fn crop(item: &mut Item, rect: (isize, isize, usize, usize)) {
    let img = &item.image;
    let data = img
        .data
        .chunks_exact(img.h * img.w)
        .flat_map(|p| crop_plane(p, img.h, img.w, rect, 0.0))
        .collect();
    if let Some(m) = &item.mask {
        item.mask = Some(crop_plane(m, img.h, img.w, rect, IGNORE_INDEX));
    }
    item.image = FImage {
        c: img.c,
        h: rect.2,
        w: rect.3,
        data,
    };
}

/// Bilinear (half-pixel centres) resize of every plane; masks by nearest neighbour.
fn resize(item: &mut Item, (oh, ow): (usize, usize)) {
    let img = &item.image;
    if (img.h, img.w) == (oh, ow) {
        return;
    }
    let src =
        |o: usize, n: usize, on: usize| ((o as f32 + 0.5) * n as f32 / on as f32 - 0.5).clamp(0.0, (n - 1) as f32);
    let mut data = Vec::with_capacity(img.c * oh * ow);
    for p in img.data.chunks_exact(img.h * img.w) {
        for y in 0..oh {
            let sy = src(y, img.h, oh);
            let (y0, ly) = (sy.floor() as usize, sy.fract());
            let y1 = (y0 + 1).min(img.h - 1);
            for x in 0..ow {
                let sx = src(x, img.w, ow);
                let (x0, lx) = (sx.floor() as usize, sx.fract());
                let x1 = (x0 + 1).min(img.w - 1);
                let top = p[y0 * img.w + x0] * (1.0 - lx) + p[y0 * img.w + x1] * lx;
                let bot = p[y1 * img.w + x0] * (1.0 - lx) + p[y1 * img.w + x1] * lx;
                data.push(top * (1.0 - ly) + bot * ly);
            }
        }
    }
    if let Some(m) = &item.mask {
        let near = |o: usize, n: usize, on: usize| ((o * n + n / 2) / on).min(n - 1);
        item.mask = Some(
            (0..oh * ow)
                .map(|i| m[near(i / ow, img.h, oh) * img.w + near(i % ow, img.w, ow)])
                .collect(),
        );
    }
    item.image = FImage {
        c: img.c,
        h: oh,
        w: ow,
        data,
    };
}

/// A random (h, w) rectangle of area fraction in `scale` and ratio in `ratio` inside (H, W).
fn random_rect(
    rng: &mut dyn RngCore,
    hh: usize,
    ww: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
) -> Option<(usize, usize, usize, usize)> {
    let area = (hh * ww) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let r = rng.random_range(lr0..=lr1).exp();
        let w = (target * r).sqrt().round() as usize;
        let h = (target / r).sqrt().round() as usize;
        if w > 0 && h > 0 && w <= ww && h <= hh {
            return Some((rng.random_range(0..=hh - h), rng.random_range(0..=ww - w), h, w));
        }
    }
    None
}

impl Transform {
    /// Applies the step to `item`.
    pub fn apply(&self, item: &mut Item, rng: &mut dyn RngCore) {
        let (h, w) = (item.image.h, item.image.w);
        match self {
            Transform::RandomCrop {
                size: (ch, cw),
                padding,
            } => {
                let p = *padding as isize;
                let y0 = rng.random_range(0..=(h + 2 * padding).saturating_sub(*ch)) as isize - p;
                let x0 = rng.random_range(0..=(w + 2 * padding).saturating_sub(*cw)) as isize - p;
                crop(item, (y0, x0, *ch, *cw));
            }
            Transform::HorizontalFlip { p } => {
                if rng.random_bool(p.clamp(0.0, 1.0)) {
                    item.image.data.chunks_exact_mut(w).for_each(|r| r.reverse());
                    if let Some(m) = &mut item.mask {
                        m.chunks_exact_mut(w).for_each(|r| r.reverse());
                    }
                }
            }
            Transform::RandomResizedCrop { size, scale, ratio } => {
                let rect = random_rect(rng, h, w, *scale, *ratio).unwrap_or_else(|| {
                    // torchvision's fallback: a centre crop with the ratio clamped to the range.
                    let r = w as f64 / h as f64;
                    let (ch, cw) = if r < ratio.0 {
                        ((w as f64 / ratio.0).round() as usize, w)
                    } else if r > ratio.1 {
                        (h, (h as f64 * ratio.1).round() as usize)
                    } else {
                        (h, w)
                    };
                    ((h - ch) / 2, (w - cw) / 2, ch, cw)
                });
                crop(item, (rect.0 as isize, rect.1 as isize, rect.2, rect.3));
                resize(item, *size);
            }
            Transform::ResizeCenterCrop {
                size: (ch, cw),
                crop_pct,
            } => {
                let scale_size = ((*ch.max(cw) as f64) / crop_pct.max(1e-6)).floor() as usize;
                let (nh, nw) = if h <= w {
                    (scale_size, (scale_size as f64 * w as f64 / h as f64).round() as usize)
                } else {
                    ((scale_size as f64 * h as f64 / w as f64).round() as usize, scale_size)
                };
                resize(item, (nh.max(*ch), nw.max(*cw)));
                let (h2, w2) = (item.image.h, item.image.w);
                crop(item, (((h2 - ch) / 2) as isize, ((w2 - cw) / 2) as isize, *ch, *cw));
            }
            Transform::Resize { size } => resize(item, *size),
            Transform::Normalize { mean, std } => {
                let plane = h * w;
                for (c, p) in item.image.data.chunks_exact_mut(plane).enumerate() {
                    let (m, s) = (mean[c.min(mean.len() - 1)], std[c.min(std.len() - 1)]);
                    p.iter_mut().for_each(|v| *v = (*v - m) / s);
                }
            }
            Transform::RandomErasing { p, scale, ratio } => {
                if rng.random_bool(p.clamp(0.0, 1.0)) {
                    if let Some((y0, x0, eh, ew)) = random_rect(rng, h, w, *scale, *ratio) {
                        for plane in item.image.data.chunks_exact_mut(h * w) {
                            for y in y0..y0 + eh {
                                plane[y * w + x0..y * w + x0 + ew].fill(0.0);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A sequence of transforms.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pipeline(pub Vec<Transform>);

impl Pipeline {
    /// Converts a sample to floats and applies every step.
    pub fn apply(&self, sample: &Sample, rng: &mut dyn RngCore) -> Item {
        let (mask, class) = match &sample.target {
            Target::Class(c) => (None, Some(*c)),
            Target::Mask(m) => (Some(m.clone()), None),
        };
        let mut item = Item {
            image: FImage::from_u8(&sample.image),
            mask,
            class,
        };
        for t in &self.0 {
            t.apply(&mut item, rng);
        }
        item
    }

    /// The usual small-image training recipe: pad-and-crop, flip, normalise.
    pub fn train_small(size: usize, padding: usize, flip: bool, mean: &[f32], std: &[f32]) -> Self {
        let mut v = vec![Transform::RandomCrop {
            size: (size, size),
            padding,
        }];
        if flip {
            v.push(Transform::HorizontalFlip { p: 0.5 });
        }
        v.push(Transform::Normalize {
            mean: mean.to_vec(),
            std: std.to_vec(),
        });
        Pipeline(v)
    }

    /// Evaluation: normalise only.
    pub fn eval(mean: &[f32], std: &[f32]) -> Self {
        Pipeline(vec![Transform::Normalize {
            mean: mean.to_vec(),
            std: std.to_vec(),
        }])
    }
}
