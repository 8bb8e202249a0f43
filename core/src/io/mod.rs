//! Files: NumPy arrays in and out, atomic writes.

mod atomic;
mod npy;
mod npz;

pub use atomic::write_atomic;
pub use npy::{NpyArray, NpyData, read_npy_matrix_f32};
pub use npz::{read_npz, write_npz};
