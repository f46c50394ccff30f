//! Every reader on files generated in the exact on-disk format, and on the embedded
//! Fashion-MNIST itself.
use lean_data::*;
use std::path::{Path, PathBuf};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lean-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn embedded() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../datasets")
}

#[test]
fn embedded_fashion_mnist_is_complete_and_balanced() {
    let train = open_dataset("fashion-mnist", &embedded(), Split::Train).unwrap();
    let test = open_dataset("fashion-mnist", &embedded(), Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!(train.image_shape(), Some([1, 28, 28]));
    assert_eq!(class_counts(train.as_ref()).unwrap(), vec![6000; 10]);
    assert_eq!(class_counts(test.as_ref()).unwrap(), vec![1000; 10]);
    assert_eq!(train.classes()[9], "Ankle boot");
    // The first labels and the pixel sum of the official files.
    let first: Vec<u32> = train.labels().unwrap()[..10].to_vec();
    assert_eq!(first, vec![9, 0, 0, 3, 0, 2, 7, 2, 5, 5]);
    let sum: u64 = (0..train.len())
        .map(|i| train.get(i).unwrap().image.data.iter().map(|&v| v as u64).sum::<u64>())
        .sum();
    assert_eq!(sum, 3_431_114_169);
}

fn write(p: &Path, b: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, b).unwrap();
}

/// Record k of a CIFAR-like file: label bytes then pixels (k + channel) % 251.
fn cifar_record(labels: &[u8], k: usize) -> Vec<u8> {
    let mut r = labels.to_vec();
    r.extend((0..3072).map(|p| ((k + p / 1024 * 7 + p) % 251) as u8));
    r
}

#[test]
fn cifar10_and_cifar100_binary() {
    let d = dir("cifar");
    let base = d.join("cifar10/cifar-10-batches-bin");
    for b in 1..=5 {
        let recs: Vec<u8> = (0..3).flat_map(|k| cifar_record(&[((b + k) % 10) as u8], k)).collect();
        write(&base.join(format!("data_batch_{b}.bin")), &recs);
    }
    write(&base.join("test_batch.bin"), &cifar_record(&[4], 0));
    write(
        &base.join("batches.meta.txt"),
        b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n",
    );
    let train = open_dataset("cifar10", &d, Split::Train).unwrap();
    assert_eq!(train.len(), 15);
    assert_eq!(train.classes()[9], "truck");
    let s = train.get(4).unwrap();
    assert_eq!(s.target, Target::Class(((2 + 1) % 10) as u32));
    assert_eq!((s.image.c, s.image.h, s.image.w), (3, 32, 32));
    assert_eq!(
        s.image.data,
        cifar_record(&[0], 1)[1..].to_vec(),
        "R, G, B planes in file order"
    );
    assert_eq!(open_dataset("cifar10", &d, Split::Test).unwrap().len(), 1);
    // Truncated record.
    let mut recs = cifar_record(&[1], 0);
    recs.pop();
    write(&base.join("test_batch.bin"), &recs);
    let e = open_dataset("cifar10", &d, Split::Test).err().unwrap().to_string();
    assert!(
        e.contains("test_batch.bin") && e.contains("3073-byte records") && e.contains("3072 bytes"),
        "{e}"
    );
    // Bad label.
    write(&base.join("test_batch.bin"), &cifar_record(&[10], 0));
    assert!(open_dataset("cifar10", &d, Split::Test)
        .err()
        .unwrap()
        .to_string()
        .contains("label 10"));
    // CIFAR-100: coarse then fine label.
    let base = d.join("cifar100/cifar-100-binary");
    write(
        &base.join("train.bin"),
        &[cifar_record(&[3, 77], 0), cifar_record(&[19, 99], 1)].concat(),
    );
    let c100 = open_dataset("cifar100", &d, Split::Train).unwrap();
    assert_eq!(c100.labels().unwrap(), &[77, 99]);
    assert_eq!(c100.classes().len(), 100);
}

#[test]
fn stl10_is_column_major_with_labels_from_one() {
    let d = dir("stl");
    let base = d.join("stl10/stl10_binary");
    // Two images: stored value at (col, row) = (row * 3 + col) % 256 in channel-plane order.
    let mut x = vec![];
    for k in 0..2u32 {
        for c in 0..3u32 {
            for col in 0..96u32 {
                for row in 0..96u32 {
                    x.push(((row * 3 + col + c + k) % 256) as u8);
                }
            }
        }
    }
    write(&base.join("train_X.bin"), &x);
    write(&base.join("train_y.bin"), &[1, 10]);
    let ds = open_dataset("stl10", &d, Split::Train).unwrap();
    assert_eq!(ds.labels().unwrap(), &[0, 9]);
    let img = ds.get(1).unwrap().image;
    let (row, col, c) = (5usize, 17usize, 2usize);
    assert_eq!(
        img.data[c * 96 * 96 + row * 96 + col] as usize,
        (row * 3 + col + c + 1) % 256
    );
    write(&base.join("train_y.bin"), &[1, 10, 3]);
    let e = open_dataset("stl10", &d, Split::Train).err().unwrap().to_string();
    assert!(e.contains("train_X.bin") && e.contains("expected 82944 bytes"), "{e}");
    write(&base.join("train_y.bin"), &[0, 10]);
    assert!(open_dataset("stl10", &d, Split::Train)
        .err()
        .unwrap()
        .to_string()
        .contains("label 0"));
}

#[test]
fn image_folders_for_classification_and_segmentation() {
    let d = dir("folders");
    for (class, n) in [("cat", 2), ("dog", 3)] {
        for i in 0..n {
            let img = image::RgbImage::from_fn(12, 10, |x, y| image::Rgb([x as u8 * 10, y as u8 * 10, i as u8]));
            let p = d.join(format!("pets/train/{class}/{i}.png"));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            img.save(&p).unwrap();
        }
    }
    let ds = open_dataset("imagefolder:pets", &d, Split::Train).unwrap();
    assert_eq!(ds.classes(), &["cat".to_string(), "dog".to_string()]);
    assert_eq!(class_counts(ds.as_ref()).unwrap(), vec![2, 3]);
    let s = ds.get(3).unwrap();
    assert_eq!((s.image.c, s.image.h, s.image.w), (3, 10, 12));
    assert_eq!(s.image.data[2 * 12 + 3], 30, "R plane, row 2, column 3");
    assert_eq!(s.image.data[120 + 2 * 12 + 3], 20, "G plane");
    let e = open_dataset("imagefolder:pets", &d, Split::Test)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("pets/val") && e.contains("not found"), "{e}");
    // Segmentation: images/ + masks/, classes.txt.
    let root = d.join("toy/train");
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::create_dir_all(root.join("masks")).unwrap();
    std::fs::write(d.join("toy/classes.txt"), "background\nthing\n").unwrap();
    image::RgbImage::from_pixel(8, 6, image::Rgb([1, 2, 3]))
        .save(root.join("images/a.png"))
        .unwrap();
    image::GrayImage::from_fn(8, 6, |x, _| {
        image::Luma([if x < 4 {
            0
        } else if x < 7 {
            1
        } else {
            255
        }])
    })
    .save(root.join("masks/a.png"))
    .unwrap();
    let seg = open_dataset("segfolder:toy", &d, Split::Train).unwrap();
    let Target::Mask(m) = seg.get(0).unwrap().target else {
        panic!("mask expected")
    };
    assert_eq!(&m[..8], &[0, 0, 0, 0, 1, 1, 1, 255]);
    image::GrayImage::from_pixel(8, 6, image::Luma([7]))
        .save(root.join("masks/a.png"))
        .unwrap();
    assert!(seg.get(0).unwrap_err().to_string().contains("mask value 7"));
    image::GrayImage::from_pixel(5, 6, image::Luma([0]))
        .save(root.join("masks/a.png"))
        .unwrap();
    assert!(seg.get(0).unwrap_err().to_string().contains("mask is 6x5"));
}

#[test]
fn pasted_fashion_segmentation_is_deterministic_and_labelled_by_ink() {
    let ds = open_dataset("fashion-mnist-seg", &embedded(), Split::Test).unwrap();
    assert_eq!(ds.classes().len(), 11);
    assert_eq!(ds.image_shape(), Some([1, 64, 64]));
    let (a, b) = (ds.get(17).unwrap(), ds.get(17).unwrap());
    assert_eq!(a, b);
    let Target::Mask(m) = &a.target else { panic!() };
    let fg = m.iter().filter(|&&v| v > 0).count();
    assert!(fg > 50 && fg < 64 * 64 / 2, "{fg} foreground pixels");
    for (v, l) in a.image.data.iter().zip(m) {
        if *l > 0 {
            assert!(*v >= 32, "a labelled pixel has ink");
            assert!(*l <= 10);
        }
    }
    assert_ne!(ds.get(18).unwrap(), a);
}

#[test]
fn missing_data_sets_say_how_to_fetch_them() {
    let d = dir("missing");
    let e = open_dataset("cifar10", &d, Split::Train).err().unwrap().to_string();
    assert!(
        e.contains("data_batch_1.bin") && e.contains(&format!("cargo xtask fetch-data cifar10 --dir {}", d.display())),
        "{e}"
    );
    let e = open_dataset("mnist", &d, Split::Test).err().unwrap().to_string();
    assert!(
        e.contains("t10k-images-idx3-ubyte") && e.contains("fetch-data mnist"),
        "{e}"
    );
    assert!(open_dataset("imagenet", &d, Split::Test)
        .err()
        .unwrap()
        .to_string()
        .contains("unknown data set `imagenet`"));
}
