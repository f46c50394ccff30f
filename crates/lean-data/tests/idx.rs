//! IDX files generated in the exact on-disk format, plain and gzip'd, and broken ones.
use lean_data::idx::{read_idx, write_idx};
use lean_data::DataError;
use std::path::PathBuf;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lean-data-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn round_trips_images_plain_and_gzipped() {
    let d = dir("roundtrip");
    let data: Vec<u8> = (0..2 * 28 * 28).map(|i| (i * 31 % 256) as u8).collect();
    for name in ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"] {
        let p = d.join(name);
        write_idx(&p, &[2, 28, 28], &data).unwrap();
        let a = read_idx(&p).unwrap();
        assert_eq!(a.dims, vec![2, 28, 28]);
        assert_eq!(a.data, data);
    }
    // The header is the canonical one: magic 0x00000803, then big-endian dims.
    let raw = std::fs::read(d.join("train-images-idx3-ubyte")).unwrap();
    assert_eq!(&raw[..8], &[0, 0, 8, 3, 0, 0, 0, 2]);
    assert!(
        !d.join("train-images-idx3-ubyte.partial").exists(),
        "no temporary file is left behind"
    );
}

#[test]
fn broken_files_give_errors_naming_the_file() {
    let d = dir("broken");
    let p = d.join("t10k-labels-idx1-ubyte");
    write_idx(&p, &[10], &[1; 10]).unwrap();
    let mut raw = std::fs::read(&p).unwrap();
    raw.truncate(raw.len() - 3);
    std::fs::write(&p, &raw).unwrap();
    let e = read_idx(&p).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DataError::Format { .. }));
    assert!(
        msg.contains("t10k-labels-idx1-ubyte") && msg.contains("expected 10 data bytes") && msg.contains("found 7"),
        "{msg}"
    );
    std::fs::write(&p, [0x12, 0x34, 0x56, 0x78, 0, 0, 0, 1]).unwrap();
    assert!(read_idx(&p)
        .unwrap_err()
        .to_string()
        .contains("bad IDX magic 0x12345678"));
    let gz = d.join("x.gz");
    std::fs::write(&gz, b"not gzip at all").unwrap();
    assert!(read_idx(&gz).unwrap_err().to_string().contains("corrupt gzip"));
    let missing = read_idx(&d.join("nope")).unwrap_err();
    assert!(matches!(missing, DataError::Io { .. }) && missing.to_string().contains("nope"));
}
