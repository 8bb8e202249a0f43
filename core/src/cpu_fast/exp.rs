//! `e^x` for the softmax, as straight-line arithmetic the compiler vectorizes (the libm
//! call it replaces runs one value at a time and was the DRN's largest cost).
//!
//! Cephes' `expf`: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, `e^r` by a degree-7 polynomial,
//! `2^n` built in the exponent bits. Relative error within 2 ulp of `f32::exp` (tested
//! below). The softmax calls it on `x <= 0`, and the model's SwiGLU gate on `-|x|`.

/// `e^x` for `x <= 0`; `0` below `-87` (where `e^x < 1.7e-38`, under `f32`'s normal range).
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to the nearest integer and leaves it in the low mantissa
    // bits, so n needs no float-to-int conversion (which does not vectorize on SSE2).
    const ROUND: f32 = 12_582_912.0;
    const FLOOR: f32 = -87.0;
    let xc = if x < FLOOR { FLOOR } else { x };
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * r
        * r)
        + r
        + 1.0;
    let n_bits = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits((n_bits.wrapping_add(127) as u32) << 23);
    if x < FLOOR { 0.0 } else { p * scale }
}

#[cfg(test)]
mod tests {
    use super::exp_nonpositive;

    #[test]
    fn within_two_ulp_of_libm_on_the_softmax_range() {
        let mut worst = 0.0f64;
        let mut x = 0.0f32;
        while x > -87.0 {
            let (got, want) = (exp_nonpositive(x), x.exp());
            let ulp = f64::from(want) * f64::from(f32::EPSILON);
            worst = worst.max((f64::from(got) - f64::from(want)).abs() / ulp);
            x -= 0.000_731;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
        assert_eq!(exp_nonpositive(-1000.0), 0.0);
        assert_eq!(exp_nonpositive(f32::MIN), 0.0);
    }
}
