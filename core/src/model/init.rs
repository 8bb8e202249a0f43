//! Seeded parameter initialisation from the crate's own generator, so a seed gives the
//! same initial weights on every backend (the CPU and wgpu runs of one config start
//! from identical models).

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::rng::SplitMix64;

/// A parameter of `shape` with entries drawn from `N(0, std^2)`.
pub fn normal_param<B: Backend, const D: usize>(
    rng: &mut SplitMix64,
    shape: [usize; D],
    std: f64,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    let values: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| (rng.normal() * std) as f32)
        .collect();
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

/// A parameter of `shape` filled with `value`.
pub fn constant_param<B: Backend, const D: usize>(
    shape: [usize; D],
    value: f32,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    Param::from_tensor(Tensor::full(shape, value, device))
}

/// A tensor of `shape` drawn from `N(mean, std^2)` with seed `seed`: test data that is the
/// same on every run (burn's `Tensor::random` seeds one generator for the whole process,
/// which tests running side by side share).
#[cfg(test)]
pub(crate) fn drawn<B: Backend, const D: usize>(
    shape: [usize; D],
    (mean, std): (f64, f64),
    seed: u64,
    device: &B::Device,
) -> Tensor<B, D> {
    normal_param(&mut SplitMix64::new(seed), shape, std, device)
        .val()
        .add_scalar(mean)
}
