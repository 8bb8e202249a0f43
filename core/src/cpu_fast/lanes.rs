//! Row reductions written as eight independent lanes. Rust keeps `f32` addition in
//! program order, so a plain `iter().sum()` cannot be vectorized; eight partial sums
//! can (and give the same answer up to rounding, which the conformance tolerances allow).

const LANES: usize = 8;

/// `sum_j x_j`.
#[inline]
pub(super) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    fold(acc) + tail.iter().sum::<f32>()
}

/// `sum_j x_j y_j`.
#[inline]
pub(super) fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (cx, cy) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let tail: f32 = cx
        .remainder()
        .iter()
        .zip(cy.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in cx.zip(cy) {
        for l in 0..LANES {
            acc[l] += a[l] * b[l];
        }
    }
    fold(acc) + tail
}

/// `sum_j (x_j - mu)^2`.
#[inline]
pub(super) fn squared_deviation(x: &[f32], mu: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|v| (v - mu) * (v - mu)).sum();
    for c in chunks {
        for l in 0..LANES {
            let d = c[l] - mu;
            acc[l] += d * d;
        }
    }
    fold(acc) + tail
}

/// `max_j x_j` (`-inf` for an empty row). Inputs are finite.
#[inline]
pub(super) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            // A compare-and-select, not f32::max, whose NaN rules cost extra instructions.
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = acc
        .into_iter()
        .fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m });
    for &v in tail {
        m = if v > m { v } else { m };
    }
    m
}

/// Whether every value is finite (no NaN, no infinity): the exponent bits are not all
/// ones. A branch-free pass; the caller finds the first offender only on failure.
#[inline]
pub(super) fn all_finite(x: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    let mut bad = [0u32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            bad[l] |= u32::from(c[l].to_bits() & EXPONENT == EXPONENT);
        }
    }
    let tail_bad = tail.iter().any(|v| !v.is_finite());
    bad.iter().all(|&b| b == 0) && !tail_bad
}

fn fold(acc: [f32; LANES]) -> f32 {
    // Pairwise, so the lanes' rounding errors do not pile up on one side.
    let a = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (a[0] + a[2]) + (a[1] + a[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_match_plain_loops_on_every_tail_length() {
        for n in 0..40usize {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37) % 11) as f32 * 0.25 - 1.0)
                .collect();
            let y: Vec<f32> = (0..n).map(|i| ((i * 13) % 7) as f32 * 0.5 - 1.5).collect();
            let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
            assert!(close(sum(&x), x.iter().sum()), "sum n={n}");
            let d: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
            assert!(close(dot(&x, &y), d), "dot n={n}");
            let q: f32 = x.iter().map(|v| (v - 0.3) * (v - 0.3)).sum();
            assert!(close(squared_deviation(&x, 0.3), q), "sq n={n}");
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&x), m, "max n={n}");
            assert!(all_finite(&x));
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for at in 0..n {
                    let mut z = x.clone();
                    z[at] = bad;
                    assert!(!all_finite(&z), "n={n} at={at} {bad}");
                }
            }
        }
    }
}
