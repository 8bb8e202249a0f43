//! The learning-rate schedule: linear warmup, then cosine decay to a floor.

/// Learning rate at optimizer step `step` (1-based) of `total`: rises linearly from
/// `peak / warmup` to `peak` over the first `warmup` steps, then follows a half cosine
/// down to `floor` at step `total`.
pub fn learning_rate(step: u64, total: u64, warmup: u64, peak: f64, floor: f64) -> f64 {
    if step <= warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    floor + 0.5 * (peak - floor) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::learning_rate;

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        assert!((learning_rate(1, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((learning_rate(10, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((learning_rate(55, 100, 10, 1.0, 0.1) - 0.55).abs() < 1e-12);
        assert!((learning_rate(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((learning_rate(150, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((learning_rate(1, 100, 0, 1.0, 0.1) - 1.0).abs() < 1e-3);
    }
}
