//! Calibration of `p_0`: the threshold at which the first batch activates about `T`
//! experts per token (DESIGN.md section 1).

use crate::cpu::{check_finite, rank_experts};
use crate::error::{Error, Result};
use crate::ops::{RouteShape, check_len};

/// Mean over tokens of the probability mass of each token's `T` top-ranked experts.
///
/// A token whose threshold equals that mass selects exactly `T` experts, so the mean
/// is the operating point. A fractional `T` interpolates between the masses of the
/// `floor(T)` and `ceil(T)` top experts. The result is clamped into `(0, 1]`.
pub fn calibrate_threshold(probs: &[f32], shape: RouteShape, target: f64) -> Result<f64> {
    const OP: &str = "calibrate_threshold";
    check_len(OP, "probs", probs.len(), shape.len())?;
    check_finite(OP, "probability", probs, shape.experts)?;
    if !(target.is_finite() && target >= 1.0 && target <= shape.experts as f64) {
        return Err(Error::param(
            "target T",
            target,
            format!("a value in [1, E = {}]", shape.experts),
        ));
    }
    let whole = target.floor() as usize;
    let frac = target - whole as f64;
    let mut total = 0.0f64;
    for row in probs.chunks_exact(shape.experts) {
        let order = rank_experts(row);
        let mass: f64 = order[..whole].iter().map(|&j| f64::from(row[j])).sum();
        let next = order.get(whole).map_or(0.0, |&j| f64::from(row[j]));
        total += mass + frac * next;
    }
    let p = total / shape.tokens as f64;
    Ok(p.clamp(f64::MIN_POSITIVE, 1.0))
}
