//! The fast CPU routing ops against the CPU reference: the whole conformance suite (every
//! shape, large ones included), and the same results on one thread as on many.

use dtopp::cpu_fast::CpuFast;
use dtopp::ops::{Normalization, RouteShape, RoutingOps};
use dtopp::rng::SplitMix64;
use dtopp_tests::{assert_conforms, cases};

#[test]
fn fast_cpu_ops_conform_to_the_cpu_reference() {
    let started = std::time::Instant::now();
    assert_conforms(&CpuFast, cases(2026));
    println!(
        "fast CPU conformance on {} threads took {:.1} s",
        CpuFast.threads(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn fast_cpu_results_do_not_depend_on_the_thread_count() {
    let (n, e) = (20_000, 64);
    let shape = RouteShape::new(n, e).unwrap();
    let mut rng = SplitMix64::new(11);
    let logits: Vec<f32> = (0..n * e).map(|_| rng.normal() as f32).collect();
    let grad: Vec<f32> = (0..n * e).map(|_| rng.normal() as f32).collect();
    let norm = Normalization::Drn { theta: 1.7 };
    let run = || {
        let ops = CpuFast;
        let routed = ops
            .drn_top_p(&logits, shape, norm, &vec![0.6], Some(12))
            .unwrap();
        let plan = ops.dispatch_plan(&routed.selection).unwrap();
        let grads = ops
            .drn_backward(&logits, &routed.probs, &grad, shape, norm)
            .unwrap();
        (routed, plan, grads)
    };
    let many = run();
    let one = rayon_one_thread(run);
    assert_eq!(
        many, one,
        "the fast CPU ops gave different results on one thread"
    );
}

/// Runs `f` inside a one-thread rayon pool.
fn rayon_one_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(f)
}
