//! A small deterministic random number generator (SplitMix64). Hand-rolled on purpose:
//! its output is fixed by this file alone, so simulator streams, synthetic data and
//! checkpointed RNG state stay identical across dependency upgrades and on wasm.

use serde::{Deserialize, Serialize};

/// SplitMix64 (Steele, Lea, Flood 2014): 64-bit state, passes BigCrush.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator for sub-stream `(a, b)` of `seed`: independent streams per step and
    /// layer, so what one consumer draws never shifts another's numbers.
    pub fn substream(seed: u64, a: u64, b: u64) -> Self {
        let mut g = Self::new(seed ^ 0x5851_F42D_4C95_7F2D);
        let x = g.next_u64() ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut g = Self::new(x);
        Self::new(g.next_u64() ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `0..n` (`n >= 1`; the modulo bias is below 2^-40 for n < 2^24).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Standard normal (Box-Muller; one of the pair is discarded to keep state simple).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: ln is finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}
