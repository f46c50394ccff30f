//! Transforms and the batched loader.
use lean_data::transforms::{FImage, Item};
use lean_data::*;
use rand::SeedableRng;
use std::path::PathBuf;
use std::sync::Arc;

fn rng() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(7)
}

/// An item whose image value and mask value both equal y·w + x, so joint geometry is checkable.
fn coded(h: usize, w: usize) -> Item {
    let data: Vec<f32> = (0..h * w).map(|i| i as f32).collect();
    Item {
        image: FImage { c: 1, h, w, data },
        mask: Some((0..h * w).map(|i| i as u8).collect()),
        class: None,
    }
}

fn joint_ok(it: &Item) -> bool {
    let m = it.mask.as_ref().unwrap();
    it.image
        .data
        .iter()
        .zip(m)
        .all(|(v, l)| *l == 255 || (*v as u8) == *l || *v == 0.0)
}

#[test]
fn geometric_transforms_move_image_and_mask_together() {
    let mut r = rng();
    for t in [
        Transform::RandomCrop {
            size: (6, 5),
            padding: 2,
        },
        Transform::HorizontalFlip { p: 1.0 },
    ] {
        for _ in 0..20 {
            let mut it = coded(8, 10);
            t.apply(&mut it, &mut r);
            assert!(joint_ok(&it), "{t:?}: {it:?}");
        }
    }
    // Resizing interpolates the image and takes the nearest mask label: they stay within one
    // source pixel of each other (the code is y·w + x, so one pixel is at most w + 1 apart).
    let mut it = coded(8, 10);
    Transform::ResizeCenterCrop {
        size: (6, 6),
        crop_pct: 1.0,
    }
    .apply(&mut it, &mut r);
    for (v, l) in it.image.data.iter().zip(it.mask.as_ref().unwrap()) {
        assert!((v - *l as f32).abs() <= 11.0, "image {v} vs mask {l}");
    }
    let mut it = coded(8, 10);
    Transform::HorizontalFlip { p: 1.0 }.apply(&mut it, &mut r);
    assert_eq!(it.image.data[0], 9.0);
    Transform::HorizontalFlip { p: 1.0 }.apply(&mut it, &mut r);
    assert_eq!(it, coded(8, 10));
    // Padding shows as 0 in the image and as ignore (255) in the mask.
    let mut it = coded(4, 4);
    Transform::RandomCrop {
        size: (8, 8),
        padding: 2,
    }
    .apply(&mut it, &mut r);
    assert_eq!(it.mask.as_ref().unwrap().iter().filter(|&&v| v == 255).count(), 64 - 16);
}

#[test]
fn resizing_transforms_give_the_requested_sizes() {
    let mut r = rng();
    for _ in 0..20 {
        let mut it = coded(30, 40);
        Transform::RandomResizedCrop {
            size: (16, 16),
            scale: (0.08, 1.0),
            ratio: (0.75, 4.0 / 3.0),
        }
        .apply(&mut it, &mut r);
        assert_eq!(
            (it.image.h, it.image.w, it.image.data.len(), it.mask.unwrap().len()),
            (16, 16, 256, 256)
        );
    }
    // timm's eval crop: 224 / 0.875 = 256 on the shorter side, then the centre 224.
    let mut it = coded(300, 400);
    it.mask = None;
    Transform::ResizeCenterCrop {
        size: (224, 224),
        crop_pct: 0.875,
    }
    .apply(&mut it, &mut r);
    assert_eq!((it.image.h, it.image.w), (224, 224));
    // Bilinear resize of a constant stays constant; normalisation is (x - m) / s.
    let mut it = Item {
        image: FImage {
            c: 2,
            h: 5,
            w: 7,
            data: vec![0.5; 70],
        },
        mask: None,
        class: Some(1),
    };
    Transform::Resize { size: (9, 3) }.apply(&mut it, &mut r);
    assert!(it.image.data.iter().all(|v| (v - 0.5).abs() < 1e-6));
    Transform::Normalize {
        mean: vec![0.25, 0.5],
        std: vec![0.5, 2.0],
    }
    .apply(&mut it, &mut r);
    assert!((it.image.data[0] - 0.5).abs() < 1e-6 && it.image.data[27].abs() < 1e-6);
    let mut it = Item {
        image: FImage {
            c: 1,
            h: 20,
            w: 20,
            data: vec![1.0; 400],
        },
        mask: None,
        class: Some(1),
    };
    Transform::RandomErasing {
        p: 1.0,
        scale: (0.1, 0.2),
        ratio: (0.5, 2.0),
    }
    .apply(&mut it, &mut r);
    let zeros = it.image.data.iter().filter(|&&v| v == 0.0).count();
    assert!((20..=100).contains(&zeros), "{zeros} erased");
}

fn fashion(n: usize) -> Arc<dyn Dataset> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../datasets/fashion-mnist");
    let classes = FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect();
    Arc::new(read_mnist_like(&dir, Split::Test, classes).unwrap().truncate(n))
}

#[test]
fn loader_is_deterministic_by_seed_whatever_the_workers() {
    let ds = fashion(300);
    let pipe = Pipeline::train_small(28, 4, true, &[0.286], &[0.353]);
    let run = |workers: usize, seed: u64, epoch: u64| -> Vec<(Vec<usize>, Vec<f32>)> {
        let cfg = LoaderConfig {
            batch_size: 64,
            seed,
            workers,
            drop_last: false,
            ..Default::default()
        };
        let l = Loader::new(ds.clone(), pipe.clone(), cfg, candle_core::Device::Cpu).unwrap();
        l.epoch(epoch)
            .map(|b| b.unwrap())
            .map(|b| (b.indices, b.images.flatten_all().unwrap().to_vec1().unwrap()))
            .collect()
    };
    let a = run(2, 5, 0);
    assert_eq!(a.len(), 5, "300 samples in batches of 64, last one partial");
    assert_eq!(a[4].0.len(), 300 - 256);
    assert_eq!(a, run(0, 5, 0), "workers do not change the data");
    assert_eq!(a, run(3, 5, 0));
    assert_ne!(a[0].0, run(2, 6, 0)[0].0, "another seed shuffles differently");
    assert_ne!(a[0].0, run(2, 5, 1)[0].0, "another epoch shuffles differently");
    let mut all: Vec<usize> = a.iter().flat_map(|b| b.0.clone()).collect();
    all.sort();
    assert_eq!(all, (0..300).collect::<Vec<_>>(), "every sample once per epoch");
}

#[test]
fn loader_batches_masks_and_drops_the_last_batch() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../datasets");
    let ds = open_dataset("fashion-mnist-seg", &dir, Split::Test).unwrap();
    let cfg = LoaderConfig {
        batch_size: 600,
        drop_last: true,
        workers: 2,
        ..Default::default()
    };
    let l = Loader::new(ds, Pipeline::eval(&[0.1], &[0.25]), cfg, candle_core::Device::Cpu).unwrap();
    assert_eq!(l.num_batches(), 3);
    let batches: Vec<Batch> = l.epoch(0).map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 3);
    assert_eq!(batches[0].images.dims(), &[600, 1, 64, 64]);
    assert_eq!(batches[0].targets.dims(), &[600, 64, 64]);
    // Stopping early stops the workers (no hang).
    let mut it = l.epoch(1);
    it.next().unwrap().unwrap();
    drop(it);
    assert!(Loader::new(
        fashion(3),
        Pipeline::default(),
        LoaderConfig {
            batch_size: 0,
            ..Default::default()
        },
        candle_core::Device::Cpu
    )
    .is_err());
}

#[test]
fn shards_together_make_the_batches_of_one_process() {
    let ds = fashion(50);
    let loader = |batch_size: usize, shard: Shard, shuffle: bool| {
        let cfg = LoaderConfig {
            batch_size,
            seed: 3,
            shuffle,
            drop_last: shuffle,
            workers: 0,
            shard,
            ..Default::default()
        };
        Loader::new(ds.clone(), Pipeline::default(), cfg, candle_core::Device::Cpu).unwrap()
    };
    let (world, b) = (3, 4);
    let one = loader(b * world, Shard::default(), true).batches_of(2);
    let ranks: Vec<Vec<Vec<usize>>> = (0..world)
        .map(|rank| loader(b, Shard { rank, world, pad: true }, true))
        .map(|l| {
            assert_eq!(l.num_samples(), 17, "50 padded to 51, a third each");
            l.batches_of(2)
        })
        .collect();
    assert_eq!(one.len(), 4);
    for (k, batch) in one.iter().enumerate() {
        let mut together: Vec<usize> = ranks.iter().flat_map(|r| r[k].clone()).collect();
        let mut expected = batch.clone();
        together.sort();
        expected.sort();
        assert_eq!(together, expected, "step {k}");
    }
    // Evaluation shards: no padding, every sample exactly once, sizes 17, 17, 16.
    let mut seen = vec![];
    for rank in 0..world {
        let l = loader(
            7,
            Shard {
                rank,
                world,
                pad: false,
            },
            false,
        );
        assert_eq!(l.num_samples(), [17, 17, 16][rank]);
        seen.extend(l.batches_of(0).concat());
    }
    seen.sort();
    assert_eq!(seen, (0..50).collect::<Vec<_>>());
    let bad = LoaderConfig {
        shard: Shard {
            rank: 2,
            world: 2,
            pad: false,
        },
        ..Default::default()
    };
    let err = Loader::new(ds.clone(), Pipeline::default(), bad, candle_core::Device::Cpu)
        .err()
        .unwrap();
    assert!(err.to_string().contains("rank 2"), "{err}");
}
