//! Property tests of the routing invariants (DESIGN.md section 1) on random inputs.

use dtopp::cpu::{combine, dispatch_plan, drn_backward, drn_forward, gather, top_k, top_p};
use dtopp::ops::{HostSelection, Normalization, RouteShape};
use proptest::prelude::*;

/// A random `[N, E]` logit matrix; values rounded to a grid sometimes, so ties occur.
fn logits() -> impl Strategy<Value = (RouteShape, Vec<f32>)> {
    (1usize..24, 1usize..70, any::<bool>()).prop_flat_map(|(n, e, ties)| {
        prop::collection::vec(-8.0f32..8.0, n * e).prop_map(move |mut z| {
            if ties {
                z.iter_mut().for_each(|v| *v = v.round());
            }
            (
                RouteShape {
                    tokens: n,
                    experts: e,
                },
                z,
            )
        })
    })
}

fn probs_of(shape: RouteShape, z: &[f32], theta: f32) -> Vec<f32> {
    drn_forward(z, shape, Normalization::Drn { theta }).unwrap()
}

/// `(mass of the first k ranked experts, mass of the first k - 1)` of token `i`, summed
/// in rank order as the spec does.
fn prefix_masses(probs: &[f32], s: &HostSelection, i: usize) -> (f32, f32) {
    let e = s.shape.experts;
    let k = s.counts[i] as usize;
    let mut mass = 0.0f32;
    let mut before = 0.0f32;
    for slot in 0..k {
        before = mass;
        mass += probs[i * e + s.experts[i * e + slot] as usize];
    }
    (mass, before)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn probabilities_are_a_distribution((shape, z) in logits(), theta in 0.05f32..6.0) {
        let p = probs_of(shape, &z, theta);
        for row in p.chunks_exact(shape.experts) {
            let sum: f32 = row.iter().sum();
            prop_assert!((sum - 1.0).abs() < 1e-5, "row sums to {sum}");
            prop_assert!(row.iter().all(|&v| (0.0..=1.0).contains(&v)));
        }
    }

    #[test]
    fn drn_scores_have_mean_zero_and_scale_theta((shape, z) in logits(), theta in 0.1f32..4.0) {
        // log P recovers the scores up to a per-token constant; centred, they are
        // theta * u with mean 0 and standard deviation theta * sqrt(var / (var + eps)).
        let p = probs_of(shape, &z, theta);
        for (zr, pr) in z.chunks_exact(shape.experts).zip(p.chunks_exact(shape.experts)) {
            let e = zr.len() as f64;
            let mu = zr.iter().map(|&v| f64::from(v)).sum::<f64>() / e;
            let var = zr.iter().map(|&v| (f64::from(v) - mu).powi(2)).sum::<f64>() / e;
            let logp: Vec<f64> = pr.iter().map(|&v| f64::from(v).ln()).collect();
            let m = logp.iter().sum::<f64>() / e;
            let sd = (logp.iter().map(|v| (v - m).powi(2)).sum::<f64>() / e).sqrt();
            let want = f64::from(theta) * (var / (var + 1e-6)).sqrt();
            prop_assert!((sd - want).abs() <= 1e-3 * (1.0 + want), "std of scores {sd}, want {want}");
        }
    }

    #[test]
    fn top_p_selects_the_smallest_set_reaching_p((shape, z) in logits(), theta in 0.1f32..4.0, p in 0.001f32..=1.0) {
        let probs = probs_of(shape, &z, theta);
        let s = top_p(&probs, shape, p, None).unwrap();
        for i in 0..shape.tokens {
            let k = s.counts[i] as usize;
            prop_assert!(k >= 1 && k <= shape.experts);
            let (mass, before) = prefix_masses(&probs, &s, i);
            // Reaches p, unless rounding kept even all E experts short of it.
            prop_assert!(mass >= p || k == shape.experts, "token {i}: mass {mass} < p {p}");
            // Without its last expert the set would not reach p.
            prop_assert!(k == 1 || before < p, "token {i}: {k} experts but {before} >= p {p}");
            let w: f32 = s.weights[i * shape.experts..(i + 1) * shape.experts].iter().sum();
            prop_assert!((w - 1.0).abs() < 1e-5, "weights sum to {w}");
        }
    }

    #[test]
    fn raising_p_never_removes_an_expert((shape, z) in logits(), p1 in 0.001f32..=1.0, p2 in 0.001f32..=1.0) {
        let probs = probs_of(shape, &z, 1.0);
        let (lo, hi) = if p1 <= p2 { (p1, p2) } else { (p2, p1) };
        let a = top_p(&probs, shape, lo, None).unwrap();
        let b = top_p(&probs, shape, hi, None).unwrap();
        let e = shape.experts;
        for i in 0..shape.tokens {
            let (ka, kb) = (a.counts[i] as usize, b.counts[i] as usize);
            prop_assert!(ka <= kb);
            prop_assert_eq!(&a.experts[i * e..i * e + ka], &b.experts[i * e..i * e + ka]);
        }
    }

    #[test]
    fn k_max_caps_top_p((shape, z) in logits(), p in 0.001f32..=1.0, cap in 1usize..70) {
        let cap = cap.min(shape.experts);
        let probs = probs_of(shape, &z, 1.0);
        let capped = top_p(&probs, shape, p, Some(cap)).unwrap();
        let free = top_p(&probs, shape, p, None).unwrap();
        for i in 0..shape.tokens {
            prop_assert_eq!(capped.counts[i], free.counts[i].min(cap as i32));
        }
    }

    #[test]
    fn top_k_weights_sum_to_one((shape, z) in logits(), k in 1usize..70) {
        let k = k.min(shape.experts);
        let probs = probs_of(shape, &z, 1.0);
        let s = top_k(&probs, shape, k).unwrap();
        for i in 0..shape.tokens {
            prop_assert_eq!(s.counts[i] as usize, k);
            let w: f32 = s.weights[i * shape.experts..(i + 1) * shape.experts].iter().sum();
            prop_assert!((w - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn plan_is_a_stable_expert_major_permutation((shape, z) in logits(), p in 0.001f32..=1.0, hidden in 1usize..5) {
        let probs = probs_of(shape, &z, 1.0);
        let s = top_p(&probs, shape, p, None).unwrap();
        let plan = dispatch_plan(&s).unwrap();
        let e = shape.experts;
        // Offsets are the cumulative counts; M is the total selected.
        let mut acc = 0;
        for j in 0..e {
            prop_assert_eq!(plan.expert_offsets[j], acc);
            acc += plan.expert_counts[j];
        }
        prop_assert_eq!(plan.expert_offsets[e], acc);
        prop_assert_eq!(acc, s.counts.iter().sum::<i32>());
        // Every (token, slot) appears exactly once, in its expert's slice, tokens ascending.
        let mut seen = vec![false; plan.route_tokens.len()];
        for i in 0..shape.tokens {
            for slot in 0..s.counts[i] as usize {
                let m = plan.token_routes[i * e + slot] as usize;
                prop_assert!(!std::mem::replace(&mut seen[m], true));
                prop_assert_eq!(plan.route_tokens[m] as usize, i);
                let j = s.experts[i * e + slot];
                prop_assert!(plan.expert_offsets[j as usize] as usize <= m && m < plan.expert_offsets[j as usize + 1] as usize);
                prop_assert_eq!(plan.route_weights[m], s.weights[i * e + slot]);
            }
        }
        prop_assert!(seen.iter().all(|&b| b));
        for j in 0..e {
            let slice = &plan.route_tokens[plan.expert_offsets[j] as usize..plan.expert_offsets[j + 1] as usize];
            prop_assert!(slice.windows(2).all(|w| w[0] < w[1]));
        }
        // Gather then combine with identity experts gives back x (weights sum to 1).
        let x: Vec<f32> = (0..shape.tokens * hidden).map(|v| (v % 7) as f32 - 3.0).collect();
        let y = gather(&x, hidden, &plan).unwrap();
        let back = combine(&y, hidden, &plan).unwrap();
        for (a, b) in back.iter().zip(&x) {
            prop_assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()));
        }
    }

    #[test]
    fn drn_backward_matches_finite_differences(
        (shape, z) in logits().prop_filter("small", |(s, _)| s.len() <= 200),
        theta in 0.2f32..3.0,
        drn in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let norm = if drn { Normalization::Drn { theta } } else { Normalization::Softmax };
        let mut rng = dtopp::rng::SplitMix64::new(seed);
        let w: Vec<f32> = (0..shape.len()).map(|_| rng.normal() as f32).collect();
        // L = sum w * P; dL/dP = w. Evaluated in f64 from f32 forwards.
        let loss = |z: &[f32], norm: Normalization| -> f64 {
            drn_forward(z, shape, norm).unwrap().iter().zip(&w).map(|(p, w)| f64::from(*p) * f64::from(*w)).sum()
        };
        let probs = drn_forward(&z, shape, norm).unwrap();
        let (dz, dtheta) = drn_backward(&z, &probs, &w, shape, norm).unwrap();
        // Standardization is scale-free, so step relative to each token's spread.
        let h = 1e-2f32;
        for idx in 0..shape.len().min(40) {
            let (mut zp, mut zm) = (z.clone(), z.clone());
            zp[idx] += h;
            zm[idx] -= h;
            let fd = (loss(&zp, norm) - loss(&zm, norm)) / (2.0 * f64::from(h));
            let got = f64::from(dz[idx]);
            // Tiny-variance rows are ill-conditioned for a fixed step; skip those.
            let row = &z[(idx / shape.experts) * shape.experts..(idx / shape.experts + 1) * shape.experts];
            let mu = row.iter().sum::<f32>() / row.len() as f32;
            let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / row.len() as f32;
            if drn && var < 0.25 { continue; }
            prop_assert!((fd - got).abs() <= 2e-3 + 2e-2 * fd.abs(), "dz[{idx}]: analytic {got}, numeric {fd}");
        }
        if drn {
            let ht = 1e-3f32;
            let fd = (loss(&z, Normalization::Drn { theta: theta + ht }) - loss(&z, Normalization::Drn { theta: theta - ht })) / (2.0 * f64::from(ht));
            prop_assert!((fd - f64::from(dtheta)).abs() <= 5e-3 + 2e-2 * fd.abs(), "dtheta: analytic {dtheta}, numeric {fd}");
        } else {
            prop_assert_eq!(dtheta, 0.0);
        }
    }
}
