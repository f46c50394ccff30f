//! Image folders: `root/<class>/*.{png,jpg,jpeg}` for classification (the ImageNet /
//! Imagenette layout) and `root/images/*` + `root/masks/*.png` for segmentation (VOC / CamVid
//! style: a grey mask per image, pixel = class id, 255 = ignore). Images decode on access.

use crate::dataset::{Dataset, Image, Sample, Target};
use crate::{DataError, Result};
use std::path::{Path, PathBuf};

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    Ok(v)
}

/// Decodes an image file to RGB (3 channels) or grey (1 channel), channels first.
pub fn decode_image(path: &Path, channels: usize) -> Result<Image> {
    let img = image::open(path).map_err(|e| DataError::Format {
        path: path.to_path_buf(),
        msg: format!("cannot decode image: {e}"),
    })?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data = if channels == 1 {
        img.to_luma8().into_raw()
    } else {
        let rgb = img.to_rgb8().into_raw();
        let mut planes = vec![0u8; 3 * h * w];
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            for k in 0..3 {
                planes[k * h * w + i] = px[k];
            }
        }
        planes
    };
    Ok(Image {
        c: channels,
        h,
        w,
        data,
    })
}

/// `root/<class>/<image>`: classes are the sorted sub-folder names.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    items: Vec<(PathBuf, u32)>,
    labels: Vec<u32>,
    classes: Vec<String>,
    channels: usize,
}

impl ImageFolder {
    /// Lists `root`; images decode to `channels` (1 or 3) channels.
    pub fn new(root: &Path, channels: usize) -> Result<Self> {
        let mut classes = vec![];
        let mut items = vec![];
        for d in list_dir(root)?.into_iter().filter(|p| p.is_dir()) {
            let name = d.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            let id = classes.len() as u32;
            for f in list_dir(&d)?.into_iter().filter(|p| is_image(p)) {
                items.push((f, id));
            }
            classes.push(name);
        }
        if items.is_empty() {
            return Err(DataError::Format {
                path: root.to_path_buf(),
                msg: "expected class folders holding .png/.jpg images, found none".into(),
            });
        }
        let labels = items.iter().map(|(_, l)| *l).collect();
        Ok(ImageFolder {
            items,
            labels,
            classes,
            channels,
        })
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.items.len()
    }
    fn get(&self, i: usize) -> Result<Sample> {
        let (p, l) = &self.items[i];
        Ok(Sample {
            image: decode_image(p, self.channels)?,
            target: Target::Class(*l),
        })
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn image_shape(&self) -> Option<[usize; 3]> {
        None
    }
    fn labels(&self) -> Option<&[u32]> {
        Some(&self.labels)
    }
}

/// `root/images/<stem>.{png,jpg}` with `root/masks/<stem>.png`.
#[derive(Clone, Debug)]
pub struct SegmentationFolder {
    pairs: Vec<(PathBuf, PathBuf)>,
    classes: Vec<String>,
    channels: usize,
}

impl SegmentationFolder {
    /// Lists `root`; `classes` names the mask values 0..classes.len().
    pub fn new(root: &Path, classes: Vec<String>, channels: usize) -> Result<Self> {
        let masks = root.join("masks");
        let mut pairs = vec![];
        for img in list_dir(&root.join("images"))?.into_iter().filter(|p| is_image(p)) {
            let stem = img.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            let m = masks.join(format!("{stem}.png"));
            if !m.is_file() {
                return Err(DataError::Format {
                    path: img.clone(),
                    msg: format!("expected its mask at {}, found none", m.display()),
                });
            }
            pairs.push((img, m));
        }
        if pairs.is_empty() {
            return Err(DataError::Format {
                path: root.to_path_buf(),
                msg: "expected images/ and masks/ folders with images, found none".into(),
            });
        }
        Ok(SegmentationFolder {
            pairs,
            classes,
            channels,
        })
    }
}

impl Dataset for SegmentationFolder {
    fn len(&self) -> usize {
        self.pairs.len()
    }
    fn get(&self, i: usize) -> Result<Sample> {
        let (ip, mp) = &self.pairs[i];
        let image = decode_image(ip, self.channels)?;
        let mask = decode_image(mp, 1)?;
        if (mask.h, mask.w) != (image.h, image.w) {
            return Err(DataError::Format {
                path: mp.clone(),
                msg: format!("mask is {}x{}, its image {}x{}", mask.h, mask.w, image.h, image.w),
            });
        }
        let n = self.classes.len();
        if let Some(bad) = mask.data.iter().find(|&&v| v != crate::IGNORE_INDEX && v as usize >= n) {
            return Err(DataError::Format {
                path: mp.clone(),
                msg: format!("mask value {bad} is neither a class (< {n}) nor 255"),
            });
        }
        Ok(Sample {
            image,
            target: Target::Mask(mask.data),
        })
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn image_shape(&self) -> Option<[usize; 3]> {
        None
    }
}
