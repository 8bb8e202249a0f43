//! The safetensors format (Hugging Face), written here without a dependency: an 8-byte
//! little-endian header length, a JSON header naming every tensor's dtype, shape and
//! byte range, then the raw little-endian data. PyTorch (`safetensors.torch.load_file`),
//! NumPy (`safetensors.numpy.load_file`) and JAX read it without unpickling anything.

use std::collections::BTreeMap;

use serde_json::{Value, json};

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

/// The bytes of a safetensors file holding `tensors` (in that order) and `metadata`
/// (free-form string pairs, stored under `__metadata__`).
pub fn encode_safetensors(
    tensors: &[SafeTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut offset = 0usize;
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
        if t.name == "__metadata__" || header.contains_key(t.name) {
            return Err(Error::shape(
                "safetensors",
                format!("tensor name {:?} is reserved or used twice", t.name),
            ));
        }
        let end = offset + 4 * elements;
        header.insert(
            t.name.to_string(),
            json!({ "dtype": "F32", "shape": t.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut head = serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::Parse {
        what: "safetensors header",
        message: e.to_string(),
    })?;
    // The data starts 8-byte aligned, as the reference writer pads it.
    while (8 + head.len()) % 8 != 0 {
        head.push(b' ');
    }
    let mut bytes = Vec::with_capacity(8 + head.len() + offset);
    bytes.extend_from_slice(&(head.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&head);
    for t in tensors {
        for x in t.data {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
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
        assert_eq!(header["w"]["data_offsets"], json!([0, 24]));
        assert_eq!(header["b"]["data_offsets"], json!([24, 28]));
        assert_eq!(header["__metadata__"]["format"], "pt");
        let data = &bytes[8 + n..];
        assert_eq!(data.len(), 28);
        assert_eq!(f32::from_le_bytes(data[24..28].try_into().unwrap()), -0.5);
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
