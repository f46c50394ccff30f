//! The IDX format of MNIST and Fashion-MNIST: a big-endian header (two zero bytes, a type code,
//! the number of dimensions, then each dimension as u32) followed by the data. Only unsigned
//! bytes (type 0x08) occur in these data sets. Files ending in `.gz` are decompressed.

use crate::{DataError, Result};
use candle_core::{Device, Tensor};
use std::io::{Read, Write};
use std::path::Path;

/// An IDX array of unsigned bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// The dimensions, outermost first (e.g. [60000, 28, 28]).
    pub dims: Vec<usize>,
    /// The values in row-major order.
    pub data: Vec<u8>,
}

impl IdxArray {
    /// The array as a u8 tensor of shape `dims`.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.data, self.dims.as_slice(), device)?)
    }
}

fn format_err(path: &Path, msg: String) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        msg,
    }
}

/// Reads an IDX file of unsigned bytes (gzip'd if its name ends in `.gz`).
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| format_err(path, format!("corrupt gzip stream: {e}")))?;
        out
    } else {
        raw
    };
    parse_idx(path, &bytes)
}

fn parse_idx(path: &Path, b: &[u8]) -> Result<IdxArray> {
    if b.len() < 4 {
        return Err(format_err(
            path,
            format!("expected an IDX header of at least 4 bytes, found {} bytes", b.len()),
        ));
    }
    if b[0] != 0 || b[1] != 0 || b[2] != 0x08 {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        return Err(format_err(
            path,
            format!("bad IDX magic 0x{magic:08x}: expected 0x0000080N (unsigned bytes, N dimensions)"),
        ));
    }
    let nd = b[3] as usize;
    let header = 4 + 4 * nd;
    if nd == 0 || b.len() < header {
        return Err(format_err(
            path,
            format!(
                "expected a header of {header} bytes for {nd} dimensions, found {} bytes",
                b.len()
            ),
        ));
    }
    let dims: Vec<usize> = (0..nd)
        .map(|i| u32::from_be_bytes(b[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    let want = dims
        .iter()
        .try_fold(1usize, |a, d| a.checked_mul(*d))
        .ok_or_else(|| format_err(path, format!("dimensions {dims:?} overflow")))?;
    let found = b.len() - header;
    if found != want {
        return Err(format_err(
            path,
            format!("expected {want} data bytes for dimensions {dims:?}, found {found} (truncated or wrong file?)"),
        ));
    }
    Ok(IdxArray {
        dims,
        data: b[header..].to_vec(),
    })
}

/// Writes an IDX file of unsigned bytes (gzip'd if the name ends in `.gz`), atomically: the
/// data go to a temporary file beside `path` that is renamed over it when complete.
pub fn write_idx(path: &Path, dims: &[usize], data: &[u8]) -> Result<()> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    if dims.iter().product::<usize>() != data.len() || dims.is_empty() || dims.len() > 255 {
        return Err(format_err(
            path,
            format!("{} values do not fill dimensions {dims:?}", data.len()),
        ));
    }
    let mut bytes = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        let d = u32::try_from(*d).map_err(|_| format_err(path, format!("dimension {d} exceeds u32")))?;
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    if path.extension().is_some_and(|e| e == "gz") {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&bytes).map_err(io)?;
        bytes = enc.finish().map_err(io)?;
    }
    let tmp = path.with_extension(format!(
        "{}.partial",
        path.extension().and_then(|e| e.to_str()).unwrap_or("idx")
    ));
    std::fs::write(&tmp, &bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
