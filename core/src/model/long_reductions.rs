//! Reductions over a long axis (the batch's tokens, or everything), in blocks.
//!
//! burn-cubecl 0.21 as dtopp builds it (no autotune) reduces along an axis, and takes
//! `mean`, `max` and `min` over a whole tensor, with one invocation per output looping
//! over the reduced axis. On a GPU that loop is serial; on Mesa's lavapipe, which ends
//! shader loops after 65535 iterations, it silently stops after about 65532 elements:
//! the mean of 72,000 ones comes out as 0.91 (`tests/tests/long_reductions.rs`). A
//! micro-batch of more tokens than that would train on wrong losses. Here a long axis is
//! first reduced in blocks of [`BLOCK`] (repeatedly, until at most [`BLOCK`] remain), so
//! no loop is longer than [`BLOCK`]. burn's full `sum` runs another kernel, measured exact
//! there at every length tested (up to 900,003 elements); it is used as is.

use burn::tensor::backend::Backend;
use burn::tensor::{Element, Int, Numeric, Tensor};

/// The longest axis one reduction loop walks.
const BLOCK: usize = 256;

/// `[C]` sums over the rows of `x` `[N, C]` (float or integer).
pub fn column_sums<B: Backend, K>(x: Tensor<B, 2, K>) -> Tensor<B, 1, K>
where
    K: Numeric<B>,
    K::Elem: Element,
{
    let c = x.dims()[1];
    fold_rows(
        x,
        |x| x.sum_dim(1),
        |shape, device| Tensor::zeros(shape, device),
    )
    .sum_dim(0)
    .reshape([c])
}

/// `[C]` means over the rows of `x` `[N, C]`.
pub fn column_means<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 1> {
    let n = x.dims()[0];
    column_sums(x).div_scalar(n as f64)
}

/// `[1]` the mean of every element of `x`.
pub fn mean_of_all<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, 1> {
    let n = x.shape().num_elements();
    column_means(x.reshape([n, 1]))
}

/// `[1]` the largest element of `x` `[N]`.
pub fn int_max<B: Backend>(x: Tensor<B, 1, Int>) -> Tensor<B, 1, Int> {
    let n = x.dims()[0];
    let first = x.clone().narrow(0, 0, 1).reshape([1, 1]);
    // Padding repeats an element: neutral for a maximum.
    fold_rows(
        x.reshape([n, 1]),
        |x| x.max_dim(1),
        |[rows, _], _| first.clone().expand([rows, 1]),
    )
    .max_dim(0)
    .reshape([1])
}

/// `[1]` the smallest element of `x` `[N]`.
pub fn int_min<B: Backend>(x: Tensor<B, 1, Int>) -> Tensor<B, 1, Int> {
    int_max(x.neg()).neg()
}

/// Reduces blocks of [`BLOCK`] rows of `x` `[N, C]` into one (`reduce` takes `[.., BLOCK,
/// C]` along its axis 1) until at most [`BLOCK`] rows remain; `pad` makes the rows that
/// fill the last block.
fn fold_rows<B: Backend, K>(
    mut x: Tensor<B, 2, K>,
    reduce: impl Fn(Tensor<B, 3, K>) -> Tensor<B, 3, K>,
    pad: impl Fn([usize; 2], &B::Device) -> Tensor<B, 2, K>,
) -> Tensor<B, 2, K>
where
    K: Numeric<B>,
    K::Elem: Element,
{
    let device = x.device();
    let [mut n, c] = x.dims();
    while n > BLOCK {
        let blocks = n.div_ceil(BLOCK);
        let missing = blocks * BLOCK - n;
        if missing > 0 {
            x = Tensor::cat(vec![x, pad([missing, c], &device)], 0);
        }
        x = reduce(x.reshape([blocks, BLOCK, c])).reshape([blocks, c]);
        n = blocks;
    }
    x
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::{Int, Tensor, TensorData};

    use super::{column_means, column_sums, int_max, int_min, mean_of_all};

    type B = NdArray;

    #[test]
    fn blocked_reductions_equal_the_plain_ones() {
        let device = Default::default();
        for n in [1usize, 255, 256, 257, 70_000] {
            let values: Vec<i64> = (0..n * 3)
                .map(|i| ((i * 7919) % 1013) as i64 - 500)
                .collect();
            let ints =
                Tensor::<B, 2, Int>::from_data(TensorData::new(values.clone(), [n, 3]), &device);
            let floats = ints.clone().float();
            let ints_of = |t: Tensor<B, 1, Int>| -> Vec<i64> {
                t.into_data().convert::<i64>().to_vec().unwrap()
            };
            let floats_of = |t: Tensor<B, 1>| -> Vec<f32> { t.into_data().to_vec().unwrap() };
            assert_eq!(
                ints_of(column_sums(ints.clone())),
                ints_of(ints.clone().sum_dim(0).reshape([3])),
                "n {n}"
            );
            assert_eq!(
                floats_of(column_sums(floats.clone())),
                floats_of(floats.clone().sum_dim(0).reshape([3]))
            );
            let means = floats_of(column_means(floats.clone()));
            let want = floats_of(floats.clone().mean_dim(0).reshape([3]));
            assert!(
                means.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-4),
                "{means:?} {want:?}"
            );
            let mean = floats_of(mean_of_all(floats.clone()))[0];
            let want = floats_of(floats.clone().mean().reshape([1]))[0];
            assert!((mean - want).abs() < 1e-4, "{mean} {want}");
            let column = ints.clone().narrow(1, 1, 1).reshape([n]);
            assert_eq!(
                ints_of(int_max(column.clone())),
                vec![*values.iter().skip(1).step_by(3).max().unwrap()]
            );
            assert_eq!(
                ints_of(int_min(column)),
                vec![*values.iter().skip(1).step_by(3).min().unwrap()]
            );
        }
    }
}
