//! Files: NumPy arrays in and out, safetensors out, atomic writes.

mod atomic;
mod npy;
mod npz;
mod safetensors;

pub use atomic::write_atomic;
pub use npy::{NpyArray, NpyData, read_npy_matrix_f32};
pub use npz::{read_npz, write_npz};
pub use safetensors::{SafeTensor, encode_safetensors};
