//! Dynamic Routing Normalization on the CPU: the spec in plain loops.
//!
//! Per token `i` over the expert axis (`E` values):
//!   mu_i = mean_j z_ij,  sigma_i = sqrt(mean_j (z_ij - mu_i)^2 + eps)
//!   u_ij = (z_ij - mu_i) / sigma_i,  zhat_ij = theta * u_ij,  P_ij = softmax_j(zhat_ij)
//! Sums run sequentially in `f32`; device kernels reduce in another order, hence the
//! float tolerances of the conformance suite.

use crate::error::{Error, Result};
use crate::ops::{DRN_EPS, Normalization, RouteShape, check_len};

/// Fails on the first non-finite value in row-major order.
pub(crate) fn check_finite(
    op: &'static str,
    what: &'static str,
    values: &[f32],
    width: usize,
) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(at) => Err(Error::NonFinite {
            op,
            what,
            token: at / width,
            column: at % width,
            value: values[at],
        }),
    }
}

/// The standardized logits `u` of one token and its `sigma`.
fn standardize(z: &[f32]) -> (Vec<f32>, f32) {
    let e = z.len() as f32;
    let mut sum = 0.0f32;
    for &v in z {
        sum += v;
    }
    let mu = sum / e;
    let mut sq = 0.0f32;
    for &v in z {
        sq += (v - mu) * (v - mu);
    }
    let sigma = (sq / e + DRN_EPS).sqrt();
    (z.iter().map(|&v| (v - mu) / sigma).collect(), sigma)
}

/// Numerically stable softmax (subtract the max before `exp`).
fn softmax(x: &[f32], out: &mut [f32]) {
    let mut max = f32::NEG_INFINITY;
    for &v in x {
        max = max.max(v);
    }
    let mut sum = 0.0f32;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v - max).exp();
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

/// The pre-softmax scores of one token under `norm`, plus the standardized `u` and
/// `sigma` that DRN's backward needs (`u = z`, `sigma = 1` for plain softmax).
fn scores(z: &[f32], norm: Normalization) -> (Vec<f32>, Vec<f32>, f32) {
    match norm {
        Normalization::Drn { theta } => {
            let (u, sigma) = standardize(z);
            (u.iter().map(|&v| theta * v).collect(), u, sigma)
        }
        Normalization::Softmax => (z.to_vec(), z.to_vec(), 1.0),
    }
}

/// `P = softmax(DRN(z))` (or `softmax(z)`), `[N, E]`.
pub fn drn_forward(logits: &[f32], shape: RouteShape, norm: Normalization) -> Result<Vec<f32>> {
    const OP: &str = "drn_forward";
    check_len(OP, "logits", logits.len(), shape.len())?;
    norm.theta()?;
    check_finite(OP, "router logit", logits, shape.experts)?;
    let mut probs = vec![0.0f32; shape.len()];
    for (z, p) in logits
        .chunks_exact(shape.experts)
        .zip(probs.chunks_exact_mut(shape.experts))
    {
        let (zhat, _, _) = scores(z, norm);
        softmax(&zhat, p);
    }
    Ok(probs)
}

/// Backward of [`drn_forward`]: returns `(dL/dz [N, E], dL/dtheta)`.
///
/// Per token, with `dP` the incoming gradient:
///   dzhat_j = P_j (dP_j - sum_k P_k dP_k)                      (softmax)
///   dtheta += sum_j dzhat_j u_j                                  (scale)
///   du_j    = theta dzhat_j
///   dz_j    = (du_j - mean(du) - u_j mean(du * u)) / sigma       (standardization)
/// The last line is exact with `eps`: `eps` enters only through `sigma`.
pub fn drn_backward(
    logits: &[f32],
    probs: &[f32],
    grad_probs: &[f32],
    shape: RouteShape,
    norm: Normalization,
) -> Result<(Vec<f32>, f32)> {
    const OP: &str = "drn_backward";
    check_len(OP, "logits", logits.len(), shape.len())?;
    check_len(OP, "probs", probs.len(), shape.len())?;
    check_len(OP, "grad_probs", grad_probs.len(), shape.len())?;
    norm.theta()?;
    check_finite(OP, "router logit", logits, shape.experts)?;
    check_finite(OP, "gradient", grad_probs, shape.experts)?;
    let e = shape.experts;
    let mut grad_logits = vec![0.0f32; shape.len()];
    // A sum over all N E terms, which cancel: accumulated in f64, so the reference is
    // the accurate value the devices' per-token partials and trees approach (a running
    // f32 sum drifted by 0.3% at N = 65536, E = 64).
    let mut grad_theta = 0.0f64;
    for i in 0..shape.tokens {
        let row = i * e..(i + 1) * e;
        let (p, dp) = (&probs[row.clone()], &grad_probs[row.clone()]);
        let mut dot = 0.0f32;
        for j in 0..e {
            dot += p[j] * dp[j];
        }
        let dzhat: Vec<f32> = (0..e).map(|j| p[j] * (dp[j] - dot)).collect();
        let dz = &mut grad_logits[row.clone()];
        match norm {
            Normalization::Softmax => dz.copy_from_slice(&dzhat),
            Normalization::Drn { theta } => {
                let (_, u, sigma) = scores(&logits[row], norm);
                let mut du_mean = 0.0f32;
                let mut du_u_mean = 0.0f32;
                for j in 0..e {
                    grad_theta += f64::from(dzhat[j] * u[j]);
                    du_mean += theta * dzhat[j];
                    du_u_mean += theta * dzhat[j] * u[j];
                }
                du_mean /= e as f32;
                du_u_mean /= e as f32;
                for j in 0..e {
                    dz[j] = (theta * dzhat[j] - du_mean - u[j] * du_u_mean) / sigma;
                }
            }
        }
    }
    Ok((grad_logits, grad_theta as f32))
}
