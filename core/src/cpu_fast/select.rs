//! Top-p and Top-k for one token without sorting all `E` experts. One vectorized pass
//! measures the mass and count of the experts at or above four thresholds (the token's
//! top probability over 2, 4, 8, 16); the highest threshold whose set can hold the
//! selection gives the candidates, a prefix of the rank order, and only those (about
//! `k` to `2k`) are sorted by insertion. The rank-order `f32` prefix sum then decides `k`
//! exactly as the reference does; if the candidates turn out too few (rounding, `p = 1`,
//! flat rows), the token falls back to the first `FAST_CAP` ranks by insertion, then to a
//! full sort. So the selections are [`crate::cpu::top_p`]'s and [`crate::cpu::top_k`]'s
//! bit for bit, weights included.

/// Ranks kept by the insertion fallback; more than that takes the full sort.
const FAST_CAP: usize = 32;

/// Thresholds of the candidate pass, as fractions of the token's top probability.
const LADDER: [f32; 4] = [0.5, 0.25, 0.125, 0.0625];

/// How a token's experts are chosen.
#[derive(Clone, Copy, Debug)]
pub(super) enum Rule {
    /// The fewest ranks whose mass reaches `p`, at most `k_cap` (`k_max`, else `E`).
    TopP { p: f32, k_cap: usize },
    /// The `k` top ranks.
    TopK(usize),
}

/// Per-block working memory, sized once for `E` experts (nothing is allocated per token).
#[derive(Debug)]
pub(super) struct Scratch {
    idx: Vec<u32>,
    val: Vec<f32>,
    keys: Vec<u64>,
}

impl Scratch {
    pub(super) fn new(experts: usize) -> Self {
        Self {
            idx: vec![0; experts],
            val: vec![0.0; experts],
            keys: Vec::with_capacity(experts),
        }
    }
}

/// Selects one token's experts from its probabilities `row` (finite), writes its `[E]`
/// selection rows (experts in rank order then `-1`; weights renormalised then `0`) and
/// returns `k`.
#[inline]
pub(super) fn select_row(
    row: &[f32],
    rule: Rule,
    scratch: &mut Scratch,
    experts: &mut [i32],
    weights: &mut [f32],
) -> i32 {
    let e = row.len();
    let k_limit = match rule {
        Rule::TopP { k_cap, .. } => k_cap,
        Rule::TopK(k) => k,
    };
    let mut k = None;
    let n = candidates(row, rule, &mut scratch.idx, &mut scratch.val);
    if n > 0 && n <= FAST_CAP {
        insertion_sort(&mut scratch.idx[..n], &mut scratch.val[..n]);
        k = decide(rule, &scratch.val[..n], n >= k_limit || n == e);
    }
    if k.is_none() {
        let cap = k_limit.min(FAST_CAP).min(e);
        let filled = top_ranked(row, cap, &mut scratch.idx, &mut scratch.val);
        k = decide(rule, &scratch.val[..filled], filled >= k_limit);
    }
    let k = k.unwrap_or_else(|| {
        rank_all(row, scratch);
        decide(rule, &scratch.val, true).unwrap_or(k_limit)
    });
    write_row(&scratch.val[..k], &scratch.idx[..k], experts, weights);
    k as i32
}

/// The experts at or above the highest [`LADDER`] threshold whose set reaches the rule
/// (mass `>= p`, or at least `k` experts), compacted into `idx` / `val` in index order;
/// returns how many (`0`: no threshold qualifies). The set is a prefix of the rank order
/// whatever the threshold, so choosing it by a differently rounded sum is safe: the
/// caller checks the exact rank-order sum.
#[inline]
fn candidates(row: &[f32], rule: Rule, idx: &mut [u32], val: &mut [f32]) -> usize {
    let top = super::lanes::max(row);
    // Rows are finite here, so this is `!(top > 0)`: no positive mass to take a fraction of.
    if top <= 0.0 {
        return 0;
    }
    let t = LADDER.map(|f| top * f);
    let mut mass = [[0.0f32; 8]; 4];
    let mut count = [[0u32; 8]; 4];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for s in 0..4 {
            for l in 0..8 {
                let take = c[l] >= t[s];
                mass[s][l] += if take { c[l] } else { 0.0 };
                count[s][l] += u32::from(take);
            }
        }
    }
    let chosen = (0..4).find(|&s| {
        let m = mass[s].iter().sum::<f32>() + tail.iter().filter(|&&v| v >= t[s]).sum::<f32>();
        let c = count[s].iter().sum::<u32>() as usize + tail.iter().filter(|&&v| v >= t[s]).count();
        match rule {
            Rule::TopP { p, .. } => m >= p,
            Rule::TopK(k) => c >= k,
        }
    });
    let Some(s) = chosen else { return 0 };
    let t = t[s];
    let mut n = 0;
    for (word, chunk) in row.chunks(64).enumerate() {
        // A bit per expert, then a visit per set bit: the candidates are few.
        let mut bits = 0u64;
        for (b, &v) in chunk.iter().enumerate() {
            bits |= u64::from(v >= t) << b;
        }
        while bits != 0 {
            let j = word * 64 + bits.trailing_zeros() as usize;
            idx[n] = j as u32;
            val[n] = row[j];
            n += 1;
            bits &= bits - 1;
        }
    }
    n
}

/// Sorts a few candidates (given in index order) into rank order; stable, so ties keep
/// the lower index first.
#[inline]
fn insertion_sort(idx: &mut [u32], val: &mut [f32]) {
    for i in 1..val.len() {
        insert_ranked(idx, val, i, idx[i], val[i]);
    }
}

/// Inserts expert `j` with probability `v` into the rank-ordered `idx[..len]` /
/// `val[..len]`, moving the lower-ranked ones up one slot (`len < idx.len()`). `<`, not
/// `<=`: a later expert goes after its equals (and -0.0 ties with 0.0, as in the
/// reference's partial_cmp).
#[inline]
fn insert_ranked(idx: &mut [u32], val: &mut [f32], len: usize, j: u32, v: f32) {
    let mut pos = len;
    while pos > 0 && val[pos - 1] < v {
        val[pos] = val[pos - 1];
        idx[pos] = idx[pos - 1];
        pos -= 1;
    }
    val[pos] = v;
    idx[pos] = j;
}

/// `k` from the ranked prefix `val`; `None` when the prefix is too short to tell
/// (`complete`: no rank beyond `val` may be selected).
#[inline]
fn decide(rule: Rule, val: &[f32], complete: bool) -> Option<usize> {
    match rule {
        Rule::TopK(k) => (val.len() >= k).then_some(k),
        Rule::TopP { p, k_cap } => {
            let mut mass = 0.0f32;
            for (rank, &v) in val.iter().enumerate() {
                mass += v;
                if mass >= p {
                    return Some((rank + 1).min(k_cap));
                }
            }
            // Reference rule: the sum never reached p, so k is E, capped at k_max.
            complete.then_some(val.len().min(k_cap))
        }
    }
}

/// The best `cap` experts of `row`, by probability descending and index ascending on
/// ties, into `idx[..cap]` / `val[..cap]`; returns how many were kept (`min(cap, E)`).
#[inline]
fn top_ranked(row: &[f32], cap: usize, idx: &mut [u32], val: &mut [f32]) -> usize {
    let mut filled = 0;
    for (j, &v) in row.iter().enumerate() {
        if filled == cap {
            // Not strictly better than the last kept: a tie keeps the earlier expert.
            if v <= val[cap - 1] {
                continue;
            }
            filled -= 1;
        }
        insert_ranked(idx, val, filled, j as u32, v);
        filled += 1;
    }
    filled
}

/// All `E` experts in rank order into `scratch.idx` / `scratch.val`: one sort of `u64`
/// keys, the probability's order-preserving bits above the complemented index.
fn rank_all(row: &[f32], scratch: &mut Scratch) {
    scratch.keys.clear();
    scratch.keys.extend(row.iter().enumerate().map(|(j, &v)| {
        // +0.0 turns -0.0 into 0.0, so that the two tie as in the reference.
        let bits = (v + 0.0).to_bits();
        let ordered = if bits >> 31 == 1 {
            !bits
        } else {
            bits | 0x8000_0000
        };
        (u64::from(ordered) << 32) | u64::from(u32::MAX - j as u32)
    }));
    // Keys are distinct (they hold the index), so an unstable sort is deterministic.
    scratch.keys.sort_unstable_by(|a, b| b.cmp(a));
    for (slot, &key) in scratch.keys.iter().enumerate() {
        let j = (u32::MAX - key as u32) as usize;
        scratch.idx[slot] = j as u32;
        scratch.val[slot] = row[j];
    }
}

/// A selection row: the `k` ranked experts and their weights `P_j / sum`, then padding.
#[inline]
fn write_row(val: &[f32], idx: &[u32], experts: &mut [i32], weights: &mut [f32]) {
    let k = val.len();
    // Summed in rank order, as the reference sums, so the weights are bit-identical.
    let mut mass = 0.0f32;
    for &v in val {
        mass += v;
    }
    let inv_uniform = 1.0 / k as f32;
    for ((x, w), (&j, &v)) in experts
        .iter_mut()
        .zip(weights.iter_mut())
        .zip(idx.iter().zip(val))
    {
        *x = j as i32;
        *w = if mass > 0.0 { v / mass } else { inv_uniform };
    }
    experts[k..].fill(-1);
    weights[k..].fill(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(row: &[f32], rule: Rule) -> (Vec<i32>, Vec<f32>, i32) {
        let shape = crate::ops::RouteShape::new(1, row.len()).unwrap();
        let s = match rule {
            Rule::TopP { p, k_cap } => {
                let k_max = (k_cap < row.len()).then_some(k_cap);
                crate::cpu::top_p(row, shape, p, k_max).unwrap()
            }
            Rule::TopK(k) => crate::cpu::top_k(row, shape, k).unwrap(),
        };
        (s.experts, s.weights, s.counts[0])
    }

    #[test]
    fn every_path_selects_what_the_reference_selects() {
        let mut rng = crate::rng::SplitMix64::new(7);
        for e in [1usize, 2, 5, 31, 32, 33, 64, 100, 256] {
            for trial in 0..40 {
                // Tied rows (few distinct values, some -0.0) and peaked or flat ones.
                let row: Vec<f32> = (0..e)
                    .map(|_| match trial % 4 {
                        0 => (rng.below(4) as f32 - 1.0) * 0.0,
                        1 => rng.below(3) as f32 * 0.25,
                        2 => (rng.normal() as f32 * 3.0).exp(),
                        _ => rng.normal() as f32,
                    })
                    .collect();
                let mut rules = vec![Rule::TopK(1), Rule::TopK(e), Rule::TopK(e.div_ceil(2))];
                for p in [0.05f32, 0.5, 0.9, 1.0] {
                    let total: f32 = row.iter().map(|v| v.abs()).sum::<f32>().max(1e-3);
                    for k_cap in [1, e.div_ceil(3), e] {
                        rules.push(Rule::TopP {
                            p: p * total,
                            k_cap,
                        });
                    }
                }
                for rule in rules {
                    let mut scratch = Scratch::new(e);
                    let (mut x, mut w) = (vec![7; e], vec![7.0; e]);
                    let k = select_row(&row, rule, &mut scratch, &mut x, &mut w);
                    if matches!(rule, Rule::TopP { p, .. } if !(p > 0.0 && p <= 1.0)) {
                        continue;
                    }
                    let (rx, rw, rk) = reference(&row, rule);
                    assert_eq!((k, &x), (rk, &rx), "E={e} trial {trial} {rule:?} {row:?}");
                    assert_eq!(w, rw, "E={e} trial {trial} {rule:?}");
                }
            }
        }
    }
}
