//! Notices the threshold controller swinging `a_t` from one side of `T` to the other on
//! every step (a period-2 limit cycle), so that the run says so while it trains.
//!
//! A PI loop on `p` cycles when its gains times the routers' slope `da/dp` pass a bound
//! (docs/controller-gains.md, "In training"); the routers sharpen as they learn, so a run
//! that tracked `T` for a thousand steps can start cycling later. Its running mean still
//! sits on `T`, which hides it from the settling statistics.

use std::collections::VecDeque;

/// Steps looked at.
const WINDOW: usize = 20;
/// Sign changes of `a_t - T` between consecutive steps, of `WINDOW - 1`, that count as
/// alternation (noise around a settled loop changes sign about half the time: 18 or more of 19 by chance is 4e-5).
const MIN_FLIPS: usize = 18;
/// The mean step-to-step change of `a_t`, as a fraction of `T`, below which swings are
/// noise rather than a cycle.
const MIN_SWING: f64 = 0.15;

/// Watches one run's `a_t`.
#[derive(Debug, Default)]
pub struct LimitCycleWatch {
    recent: VecDeque<f64>,
    reported: bool,
}

impl LimitCycleWatch {
    /// Adds one step's `a_t`. Returns a warning the first time the last steps alternate
    /// around `target` by more than noise; `None` otherwise and after that.
    pub fn observe(&mut self, active: f64, target: f64, kp: f64, ki: f64) -> Option<String> {
        if self.reported || !active.is_finite() {
            return None;
        }
        self.recent.push_back(active - target);
        if self.recent.len() > WINDOW {
            self.recent.pop_front();
        }
        if self.recent.len() < WINDOW {
            return None;
        }
        let pairs = || self.recent.iter().zip(self.recent.iter().skip(1));
        let flips = pairs().filter(|(a, b)| a.signum() != b.signum()).count();
        let swing = pairs().map(|(a, b)| (b - a).abs()).sum::<f64>() / (WINDOW - 1) as f64;
        if flips < MIN_FLIPS || swing < MIN_SWING * target {
            return None;
        }
        self.reported = true;
        Some(format!(
            "warning: a_t alternates around T = {target} on almost every step (it moves by {swing:.2} \
             per step): the threshold controller is in a limit cycle. The routers answer p too \
             steeply for Kp = {kp}, Ki = {ki}; lower routing.kp and routing.ki (about halving both; \
             docs/controller-gains.md, \"In training\")"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(watch: &mut LimitCycleWatch, values: impl IntoIterator<Item = f64>) -> Vec<String> {
        values
            .into_iter()
            .filter_map(|a| watch.observe(a, 4.0, 0.25, 0.5))
            .collect()
    }

    #[test]
    fn a_period_two_cycle_is_reported_once() {
        let mut watch = LimitCycleWatch::default();
        // The cycle measured at 6 MoE layers: 2.4 and 5.6 in turn.
        let warnings = feed(
            &mut watch,
            (0..100).map(|i| if i % 2 == 0 { 2.4 } else { 5.6 }),
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("limit cycle"));
        assert!(warnings[0].contains("Kp = 0.25, Ki = 0.5"));
    }

    #[test]
    fn tracking_noise_and_slow_swings_are_not_cycles() {
        let mut watch = LimitCycleWatch::default();
        // Alternating, but by 0.1 (2.5% of T): sampling noise around a settled loop.
        assert!(
            feed(
                &mut watch,
                (0..100).map(|i| 4.0 + if i % 2 == 0 { 0.05 } else { -0.05 })
            )
            .is_empty()
        );
        // Large but slow: ten steps above, ten below.
        let mut watch = LimitCycleWatch::default();
        assert!(
            feed(
                &mut watch,
                (0..100).map(|i| if (i / 10) % 2 == 0 { 2.0 } else { 6.0 })
            )
            .is_empty()
        );
        // A pseudo-random sequence around T changes sign about half the time.
        let mut watch = LimitCycleWatch::default();
        let mut x = 12345u64;
        let noisy = (0..200).map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            4.0 + ((x >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 3.0
        });
        assert!(feed(&mut watch, noisy).is_empty());
    }
}
