//! Files: NumPy arrays in and out, atomic writes.

mod atomic;
mod npz;
mod npy;

pub use atomic::write_atomic;
pub use npz::{read_npz, write_npz};
pub use npy::{NpyArray, NpyData, read_npy_matrix_f32};
