//! The safetensors format (Hugging Face), written by Hugging Face's own `safetensors`
//! crate: an 8-byte little-endian header length, a JSON header naming every tensor's
//! dtype, shape and byte range, then the raw little-endian data. PyTorch
//! (`safetensors.torch.load_file`), NumPy (`safetensors.numpy.load_file`) and JAX read it
//! without unpickling anything. The checks here come first so that a bad tensor is named
//! in dtopp's words.

use std::collections::{BTreeMap, HashSet};

use safetensors::tensor::{Dtype, TensorView};

use crate::error::{Error, Result};

/// One f32 tensor to write.
#[derive(Clone, Copy, Debug)]
pub struct SafeTensor<'a> {
    /// Its name (unique in the file).
    pub name: &'a str,
    /// Its shape; the product must equal `data.len()`.
    pub shape: &'a [usize],
    /// Its values, row-major.
    pub data: &'a [f32],
}

/// The bytes of a safetensors file holding `tensors` and `metadata` (free-form string
/// pairs, stored under `__metadata__`). The crate lays tensors out by dtype and name;
/// readers look them up by name.
pub fn encode_safetensors(
    tensors: &[SafeTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut names = HashSet::new();
    for t in tensors {
        let elements: usize = t.shape.iter().product();
        if elements != t.data.len() {
            return Err(Error::shape(
                "safetensors",
                format!(
                    "tensor {} has shape {:?} ({elements} values) but {} values",
                    t.name,
                    t.shape,
                    t.data.len()
                ),
            ));
        }
        if t.name == "__metadata__" || !names.insert(t.name) {
            return Err(Error::shape(
                "safetensors",
                format!("tensor name {:?} is reserved or used twice", t.name),
            ));
        }
    }
    let failed = |e: safetensors::SafeTensorError| Error::shape("safetensors", e.to_string());
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.data.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, data)| {
            TensorView::new(Dtype::F32, t.shape.to_vec(), data).map(|view| (t.name, view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(failed)?;
    let metadata = (!metadata.is_empty()).then(|| {
        metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    });
    safetensors::serialize(views, metadata).map_err(failed)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn layout_follows_the_format() {
        let a = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [-0.5f32];
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let bytes = encode_safetensors(
            &[
                SafeTensor {
                    name: "w",
                    shape: &[2, 3],
                    data: &a,
                },
                SafeTensor {
                    name: "b",
                    shape: &[1],
                    data: &b,
                },
            ],
            &meta,
        )
        .unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + n) % 8, 0);
        let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        assert_eq!(header["w"]["shape"], json!([2, 3]));
        assert_eq!(header["w"]["dtype"], "F32");
        assert_eq!(header["__metadata__"]["format"], "pt");
        // Wherever the crate places each tensor, its bytes are its values.
        let data = &bytes[8 + n..];
        assert_eq!(data.len(), 28);
        let values = |name: &str| -> Vec<f32> {
            let range = header[name]["data_offsets"].as_array().unwrap();
            let (start, end) = (
                range[0].as_u64().unwrap() as usize,
                range[1].as_u64().unwrap() as usize,
            );
            data[start..end]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        assert_eq!(values("w"), a);
        assert_eq!(values("b"), b);
    }

    #[test]
    fn mismatched_shapes_and_duplicate_names_are_refused() {
        let a = [1.0f32; 5];
        let e = encode_safetensors(
            &[SafeTensor {
                name: "w",
                shape: &[2, 3],
                data: &a,
            }],
            &BTreeMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("tensor w has shape [2, 3] (6 values) but 5 values"),
            "{e}"
        );
        let one = SafeTensor {
            name: "x",
            shape: &[5],
            data: &a,
        };
        let e = encode_safetensors(&[one, one], &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("used twice"), "{e}");
    }
}
