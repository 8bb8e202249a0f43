//! Hand-computed cases for every routing op of the CPU reference.

use dtopp::Error;
use dtopp::cpu::{combine, dispatch_plan, drn_forward, gather, top_k, top_p};
use dtopp::ops::{HostSelection, Normalization, RouteShape};

fn shape(n: usize, e: usize) -> RouteShape {
    RouteShape::new(n, e).unwrap()
}

fn close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "[{i}] got {g}, want {w} (all: {got:?})"
        );
    }
}

#[test]
fn drn_of_1_2_3() {
    // mu = 2, var = 2/3, sigma = sqrt(2/3 + 1e-6); u = (-1.2247439, 0, 1.2247439);
    // softmax(u) computed by hand (python math): 0.0625559, 0.2128961, 0.7245481.
    let p = drn_forward(
        &[1.0, 2.0, 3.0],
        shape(1, 3),
        Normalization::Drn { theta: 1.0 },
    )
    .unwrap();
    close(&p, &[0.062_555_9, 0.212_896_1, 0.724_548_1], 1e-6);
    // theta = 2 doubles the standardized scores: softmax(-2.4494878, 0, 2.4494878).
    let p = drn_forward(
        &[1.0, 2.0, 3.0],
        shape(1, 3),
        Normalization::Drn { theta: 2.0 },
    )
    .unwrap();
    close(&p, &[0.006_815_0, 0.078_934_4, 0.914_250_6], 1e-6);
    // DRN removes shift and scale of the logits.
    let q = drn_forward(
        &[-50.0, 50.0, 150.0],
        shape(1, 3),
        Normalization::Drn { theta: 2.0 },
    )
    .unwrap();
    close(&q, &p, 1e-6);
}

#[test]
fn plain_softmax_of_1_2_3() {
    let p = drn_forward(&[1.0, 2.0, 3.0], shape(1, 3), Normalization::Softmax).unwrap();
    close(&p, &[0.090_030_57, 0.244_728_48, 0.665_240_94], 1e-7);
}

#[test]
fn one_expert_gets_everything() {
    let p = drn_forward(&[3.5, -1.0], shape(2, 1), Normalization::Drn { theta: 1.0 }).unwrap();
    assert_eq!(p, vec![1.0, 1.0]);
    let s = top_p(&p, shape(2, 1), 0.3, None).unwrap();
    assert_eq!(
        (s.experts, s.counts, s.weights),
        (vec![0, 0], vec![1, 1], vec![1.0, 1.0])
    );
    let s = top_p(&p, shape(2, 1), 1.0, None).unwrap();
    assert_eq!(s.counts, vec![1, 1]);
}

#[test]
fn top_p_includes_the_crossing_expert() {
    // Ranked: 1 (0.5), 2 (0.3), 0 (0.1), 3 (0.1; ties with 0, higher index last).
    let probs = [0.1, 0.5, 0.3, 0.1];
    let s = top_p(&probs, shape(1, 4), 0.7, None).unwrap();
    assert_eq!(s.counts, vec![2]);
    assert_eq!(s.experts, vec![1, 2, -1, -1]);
    close(&s.weights, &[0.625, 0.375, 0.0, 0.0], 1e-7);
    // Exactly reaching p counts (>=): 0.5 >= 0.5.
    assert_eq!(
        top_p(&probs, shape(1, 4), 0.5, None).unwrap().counts,
        vec![1]
    );
    // Just above 0.8 needs the third expert: the tie goes to expert 0.
    let s = top_p(&probs, shape(1, 4), 0.85, None).unwrap();
    assert_eq!(s.experts, vec![1, 2, 0, -1]);
}

#[test]
fn top_p_ties_take_lower_index_first() {
    let probs = [0.25; 4];
    let s = top_p(&probs, shape(1, 4), 0.5, None).unwrap();
    assert_eq!(
        (s.experts.clone(), s.counts.clone()),
        (vec![0, 1, -1, -1], vec![2])
    );
    close(&s.weights, &[0.5, 0.5, 0.0, 0.0], 0.0);
    let s = top_p(&probs, shape(1, 4), 0.6, None).unwrap();
    assert_eq!(s.experts, vec![0, 1, 2, -1]);
}

#[test]
fn top_p_with_p_one_takes_every_expert_with_mass() {
    let probs = [0.25, 0.5, 0.25];
    let s = top_p(&probs, shape(1, 3), 1.0, None).unwrap();
    assert_eq!((s.experts, s.counts), (vec![1, 0, 2], vec![3]));
    // A sum that rounds below 1 still selects all experts (never more than E).
    let probs = [0.1f32; 10]; // f32 sum of ten 0.1 is 1.0000001 or 0.99999994
    let s = top_p(&probs, shape(1, 10), 1.0, None).unwrap();
    assert!(s.counts[0] >= 9, "{:?}", s.counts);
}

#[test]
fn k_max_caps_the_selection_and_renormalises() {
    let probs = [0.1, 0.5, 0.3, 0.1];
    let s = top_p(&probs, shape(1, 4), 0.95, Some(2)).unwrap();
    assert_eq!((s.experts.clone(), s.counts), (vec![1, 2, -1, -1], vec![2]));
    close(&s.weights, &[0.625, 0.375, 0.0, 0.0], 1e-7);
    let s = top_p(&probs, shape(1, 4), 0.95, Some(1)).unwrap();
    assert_eq!(
        (s.experts, s.weights),
        (vec![1, -1, -1, -1], vec![1.0, 0.0, 0.0, 0.0])
    );
}

#[test]
fn experts_not_a_power_of_two() {
    // E = 5, two tokens.
    let probs = [
        0.05, 0.4, 0.05, 0.3, 0.2, // token 0: ranked 1, 3, 4, 0, 2
        0.2, 0.2, 0.2, 0.2, 0.2, // token 1: all tied
    ];
    let s = top_p(&probs, shape(2, 5), 0.75, None).unwrap();
    assert_eq!(s.counts, vec![3, 4]);
    assert_eq!(s.experts, vec![1, 3, 4, -1, -1, 0, 1, 2, 3, -1]);
    close(&s.weights[..3], &[0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9], 1e-6);
    close(&s.weights[5..], &[0.25, 0.25, 0.25, 0.25, 0.0], 1e-6);
}

#[test]
fn top_k_ranks_with_the_tie_rule() {
    let probs = [0.2, 0.4, 0.2, 0.2];
    let s = top_k(&probs, shape(1, 4), 2).unwrap();
    assert_eq!((s.experts.clone(), s.counts), (vec![1, 0, -1, -1], vec![2]));
    close(&s.weights, &[2.0 / 3.0, 1.0 / 3.0, 0.0, 0.0], 1e-7);
    let s = top_k(&probs, shape(1, 4), 4).unwrap();
    assert_eq!(s.experts, vec![1, 0, 2, 3]);
    assert!(matches!(
        top_k(&probs, shape(1, 4), 5),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        top_k(&probs, shape(1, 4), 0),
        Err(Error::InvalidParameter { .. })
    ));
}

/// Token 0 -> experts [2, 0], token 1 -> [0], token 2 -> [0, 1, 2]; E = 3.
fn three_token_selection() -> HostSelection {
    HostSelection {
        shape: shape(3, 3),
        k_bound: 3,
        experts: vec![2, 0, -1, 0, -1, -1, 0, 1, 2],
        weights: vec![0.75, 0.25, 0.0, 1.0, 0.0, 0.0, 0.5, 0.3, 0.2],
        counts: vec![2, 1, 3],
    }
}

#[test]
fn dispatch_plan_is_expert_major_and_stable() {
    let plan = dispatch_plan(&three_token_selection()).unwrap();
    assert_eq!(plan.expert_counts, vec![3, 1, 2]);
    assert_eq!(plan.expert_offsets, vec![0, 3, 4, 6]);
    assert_eq!(plan.route_tokens, vec![0, 1, 2, 2, 0, 2]);
    assert_eq!(plan.route_weights, vec![0.25, 1.0, 0.5, 0.3, 0.75, 0.2]);
    assert_eq!(plan.token_routes, vec![4, 0, -1, 1, -1, -1, 2, 3, 5]);
    assert_eq!(plan.route_capacity, 6);
}

#[test]
fn gather_and_combine_by_hand() {
    let plan = dispatch_plan(&three_token_selection()).unwrap();
    // D = 2; token t has row (t, 10 t).
    let x = [0.0, 0.0, 1.0, 10.0, 2.0, 20.0];
    let g = gather(&x, 2, &plan).unwrap();
    assert_eq!(
        g,
        vec![
            0.0, 0.0, 1.0, 10.0, 2.0, 20.0, 2.0, 20.0, 0.0, 0.0, 2.0, 20.0
        ]
    );
    // Expert "FFN" y = route index m in both columns.
    let y: Vec<f32> = (0..6).flat_map(|m| [m as f32, m as f32]).collect();
    let out = combine(&y, 2, &plan).unwrap();
    // token 0: 0.75 * y4 + 0.25 * y0 = 3; token 1: 1.0 * y1 = 1;
    // token 2: 0.5 * y2 + 0.3 * y3 + 0.2 * y5 = 1 + 0.9 + 1 = 2.9.
    close(&out, &[3.0, 3.0, 1.0, 1.0, 2.9, 2.9], 1e-6);
}

#[test]
fn malformed_selections_are_rejected_by_name() {
    let mut s = three_token_selection();
    s.experts[1] = 2; // expert 2 twice in token 0
    let msg = dispatch_plan(&s).unwrap_err().to_string();
    assert!(msg.contains("token 0 slot 1"), "{msg}");
    let mut s = three_token_selection();
    s.counts[1] = 0;
    assert!(
        dispatch_plan(&s)
            .unwrap_err()
            .to_string()
            .contains("token 1 selects 0")
    );
}

#[test]
fn non_finite_inputs_name_the_first_bad_element() {
    let mut z = vec![0.0f32; 12];
    z[7] = f32::NAN;
    z[9] = f32::INFINITY;
    match drn_forward(&z, shape(3, 4), Normalization::Drn { theta: 1.0 }) {
        Err(Error::NonFinite {
            token: 1,
            column: 3,
            ..
        }) => {}
        other => panic!("expected NonFinite at token 1, column 3: {other:?}"),
    }
    let msg = top_p(&[0.5, f32::NAN], shape(1, 2), 0.5, None)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("token 0, column 1") && msg.contains("NaN"),
        "{msg}"
    );
}

#[test]
fn bad_parameters_are_rejected_by_name() {
    let probs = [0.5, 0.5];
    for p in [0.0, -0.1, 1.0001, f32::NAN] {
        let msg = top_p(&probs, shape(1, 2), p, None).unwrap_err().to_string();
        assert!(
            msg.contains("threshold p") && msg.contains("(0, 1]"),
            "{msg}"
        );
    }
    let msg = top_p(&probs, shape(1, 2), 0.5, Some(3))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("k_max"), "{msg}");
    let msg = drn_forward(
        &probs,
        shape(1, 2),
        Normalization::Drn {
            theta: f32::INFINITY,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("theta"), "{msg}");
    let msg = drn_forward(&probs, shape(1, 3), Normalization::Softmax)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("2 elements, expected 3"), "{msg}");
    assert!(RouteShape::new(0, 4).is_err());
}
