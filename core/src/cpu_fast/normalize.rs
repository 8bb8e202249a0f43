//! DRN (or plain softmax) forward and backward, one token row at a time, fast: lane
//! reductions ([`super::lanes`]), the vectorized `exp` ([`super::exp`]), one reciprocal
//! instead of a division per value, no temporaries per token. The math is
//! [`crate::cpu::drn_forward`]'s; only the order of the sums differs.

use super::exp::exp_nonpositive;
use super::lanes;
use crate::ops::DRN_EPS;

/// `mu` and `sigma` of a token's logits.
#[inline]
fn moments(z: &[f32]) -> (f32, f32) {
    let e = z.len() as f32;
    let mu = lanes::sum(z) / e;
    let sigma = (lanes::squared_deviation(z, mu) / e + DRN_EPS).sqrt();
    (mu, sigma)
}

/// One token's probabilities: `out = softmax(theta (z - mu) / sigma)`, or `softmax(z)`
/// when `theta` is `None`.
#[inline]
pub(super) fn forward_row(z: &[f32], theta: Option<f32>, out: &mut [f32]) {
    match theta {
        Some(theta) => {
            let (mu, sigma) = moments(z);
            let scale = theta / sigma;
            for (o, &v) in out.iter_mut().zip(z) {
                *o = (v - mu) * scale;
            }
        }
        None => out.copy_from_slice(z),
    }
    let max = lanes::max(out);
    for o in out.iter_mut() {
        *o = exp_nonpositive(*o - max);
    }
    let inv = 1.0 / lanes::sum(out);
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// One token's backward: writes dL/dz into `dz` and returns this token's share of
/// dL/dtheta (`0` for plain softmax). See [`crate::cpu::drn_backward`] for the algebra.
#[inline]
pub(super) fn backward_row(
    z: &[f32],
    p: &[f32],
    dp: &[f32],
    theta: Option<f32>,
    dz: &mut [f32],
) -> f32 {
    let dot = lanes::dot(p, dp);
    for ((d, &pj), &dpj) in dz.iter_mut().zip(p).zip(dp) {
        *d = pj * (dpj - dot);
    }
    let Some(theta) = theta else { return 0.0 };
    // dz holds dzhat; u = (z - mu) / sigma is recomputed instead of stored.
    let (mu, sigma) = moments(z);
    let inv_sigma = 1.0 / sigma;
    let e = z.len() as f32;
    let dzhat_sum = lanes::sum(dz);
    let mut u_dot = [0.0f32; 8];
    let (cz, cd) = (z.chunks_exact(8), dz.chunks_exact(8));
    let mut tail = 0.0f32;
    for (&zj, &dj) in cz.remainder().iter().zip(cd.remainder()) {
        tail += dj * ((zj - mu) * inv_sigma);
    }
    for (a, b) in cz.zip(cd) {
        for l in 0..8 {
            u_dot[l] += b[l] * ((a[l] - mu) * inv_sigma);
        }
    }
    let dzhat_u = u_dot.iter().sum::<f32>() + tail;
    let du_mean = theta * dzhat_sum / e;
    let du_u_mean = theta * dzhat_u / e;
    for (d, &zj) in dz.iter_mut().zip(z) {
        let u = (zj - mu) * inv_sigma;
        *d = (theta * *d - du_mean - u * du_u_mean) * inv_sigma;
    }
    dzhat_u
}
