//! The NumPy `.npy` format (versions 1.0 to 3.0), for float32 and int32 arrays: routing
//! inputs and outputs exchanged with PyTorch / NumPy users.
//!
//! Layout: magic `\x93NUMPY`, major and minor version bytes, a little-endian header
//! length (u16 in 1.0, u32 in 2.0 and 3.0), a Python dict literal such as
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (4, 8), }` padded with spaces to a
//! 64-byte boundary and ended by `\n`, then the raw values.
//!
//! Written here rather than taken from `npyz` (0.9.1), measured 2026-12-03: npyz parses
//! the header through `py_literal`, which brings 11 more crates (pest and its derive,
//! stacker and psm, whose build script compiles assembly with `cc`) into a module the
//! wasm32 browser build also compiles; this reader is 200 lines and covers every header
//! NumPy writes for float32 and int32.

use std::path::Path;

use crate::error::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// The values of an array, by element type.
#[derive(Clone, Debug, PartialEq)]
pub enum NpyData {
    /// `float32` values.
    F32(Vec<f32>),
    /// `int32` values.
    I32(Vec<i32>),
}

impl NpyData {
    fn descr(&self) -> &'static str {
        match self {
            Self::F32(_) => "<f4",
            Self::I32(_) => "<i4",
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::I32(v) => v.len(),
        }
    }
}

/// An n-dimensional array in C (row-major) order.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Values in row-major order.
    pub data: NpyData,
}

impl NpyArray {
    /// A float32 array; the shape must match the number of values.
    pub fn f32(shape: Vec<usize>, values: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        Self {
            shape,
            data: NpyData::F32(values),
        }
    }

    /// An int32 array; the shape must match the number of values.
    pub fn i32(shape: Vec<usize>, values: Vec<i32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        Self {
            shape,
            data: NpyData::I32(values),
        }
    }

    /// The `.npy` encoding (version 1.0, little-endian, C order).
    pub fn to_bytes(&self) -> Vec<u8> {
        let dims: Vec<String> = self.shape.iter().map(usize::to_string).collect();
        let shape = match dims.len() {
            1 => format!("({},)", dims[0]),
            _ => format!("({})", dims.join(", ")),
        };
        let mut header = format!(
            "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
            self.data.descr()
        );
        // Pad so that magic + version + length + header + '\n' is a multiple of 64.
        let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
        header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
        header.push('\n');
        let mut out = Vec::with_capacity(10 + header.len() + 4 * self.data.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        match &self.data {
            NpyData::F32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            NpyData::I32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        }
        out
    }

    /// Decodes `.npy` bytes; `origin` names the source in errors.
    pub fn from_bytes(bytes: &[u8], origin: &Path) -> Result<Self> {
        let fail = |message: String| Error::Array {
            path: origin.to_path_buf(),
            message,
        };
        if bytes.len() < 10 || &bytes[..6] != MAGIC {
            return Err(fail(
                "not a .npy file (missing the \\x93NUMPY magic; save arrays with numpy.save)"
                    .into(),
            ));
        }
        let (header_start, header_len) = match bytes[6] {
            1 => (10, usize::from(u16::from_le_bytes([bytes[8], bytes[9]]))),
            2 | 3 if bytes.len() >= 12 => (
                12,
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            ),
            v => {
                return Err(fail(format!(
                    "unsupported .npy version {v}.{} (expected 1.0, 2.0 or 3.0)",
                    bytes[7]
                )));
            }
        };
        let data_start = header_start + header_len;
        let header = bytes.get(header_start..data_start).ok_or_else(|| {
            fail(format!(
                "truncated header: {header_len} bytes announced, file has {}",
                bytes.len()
            ))
        })?;
        let header = std::str::from_utf8(header).map_err(|_| fail("header is not text".into()))?;
        let descr = dict_value(header, "descr")
            .and_then(quoted)
            .ok_or_else(|| fail(format!("header has no 'descr': {header:?}")))?;
        let fortran = match dict_value(header, "fortran_order") {
            Some(v) if v.starts_with("True") => true,
            Some(v) if v.starts_with("False") => false,
            _ => return Err(fail(format!("header has no 'fortran_order': {header:?}"))),
        };
        let shape = dict_value(header, "shape")
            .and_then(parse_shape)
            .ok_or_else(|| fail(format!("header has no valid 'shape': {header:?}")))?;
        let count: usize = shape.iter().product();
        let (big_endian, is_float) = match descr {
            "<f4" | "=f4" | "|f4" => (false, true),
            ">f4" => (true, true),
            "<i4" | "=i4" | "|i4" => (false, false),
            ">i4" => (true, false),
            other => {
                return Err(fail(format!(
                    "dtype '{other}' is not supported (expected float32 '<f4' or int32 '<i4'; convert with arr.astype(numpy.float32))"
                )));
            }
        };
        let payload = &bytes[data_start..];
        if payload.len() < count * 4 {
            return Err(fail(format!(
                "truncated data: shape {shape:?} needs {} bytes, the file holds {}",
                count * 4,
                payload.len()
            )));
        }
        let words = payload[..count * 4].chunks_exact(4).map(|c| {
            let b = [c[0], c[1], c[2], c[3]];
            if big_endian {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        });
        let mut data = if is_float {
            NpyData::F32(words.map(f32::from_bits).collect())
        } else {
            NpyData::I32(words.map(|w| w as i32).collect())
        };
        if fortran && shape.len() > 1 {
            data = match data {
                NpyData::F32(v) => NpyData::F32(to_c_order(&v, &shape)),
                NpyData::I32(v) => NpyData::I32(to_c_order(&v, &shape)),
            };
        }
        Ok(Self { shape, data })
    }
}

/// Reads a float32 matrix `[rows, cols]` from a `.npy` file, with errors naming the file
/// and what was wrong (missing, not .npy, truncated, wrong dtype, wrong rank, empty).
pub fn read_npy_matrix_f32(path: &Path) -> Result<(Vec<f32>, usize, usize)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("cannot read", path, e))?;
    let array = NpyArray::from_bytes(&bytes, path)?;
    let fail = |message: String| Error::Array {
        path: path.to_path_buf(),
        message,
    };
    let [rows, cols] = array.shape[..] else {
        return Err(fail(format!(
            "array has rank {} (shape {:?}), expected a 2-D [N, E] matrix",
            array.shape.len(),
            array.shape
        )));
    };
    if rows == 0 || cols == 0 {
        return Err(fail(format!(
            "array of shape [{rows}, {cols}] is empty, expected N >= 1 and E >= 1"
        )));
    }
    match array.data {
        NpyData::F32(v) => Ok((v, rows, cols)),
        NpyData::I32(_) => Err(fail(
            "dtype int32, expected float32 router logits ('<f4')".into(),
        )),
    }
}

/// The text after `'key':` in a header dict.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("'{key}':");
    let at = header.find(&pattern)? + pattern.len();
    Some(header[at..].trim_start())
}

/// The contents of a leading `'...'` string.
fn quoted(s: &str) -> Option<&str> {
    let rest = s.strip_prefix('\'')?;
    Some(&rest[..rest.find('\'')?])
}

/// A leading tuple of non-negative integers: `(4, 8)`, `(5,)`, `()`.
fn parse_shape(s: &str) -> Option<Vec<usize>> {
    let inner = &s.strip_prefix('(')?[..s[1..].find(')')?];
    inner
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.trim_end_matches('L').parse().ok())
        .collect()
}

/// Column-major (Fortran) values of `shape` re-laid in row-major order.
fn to_c_order<T: Copy>(values: &[T], shape: &[usize]) -> Vec<T> {
    let count = values.len();
    let mut out = Vec::with_capacity(count);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..count {
        // Column-major offset of the row-major multi-index.
        let mut offset = 0;
        let mut stride = 1;
        for (d, &i) in index.iter().enumerate() {
            offset += i * stride;
            stride *= shape[d];
        }
        out.push(values[offset]);
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}
