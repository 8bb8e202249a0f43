//! Reductions over more rows than lavapipe runs loop iterations (65535), on burn-wgpu:
//! the blocked forms dtopp's losses and routing counts use (`core/src/model/
//! long_reductions.rs`) are exact there, where burn's own `mean`, `mean_dim`, `sum_dim`,
//! `max` and `min` stop after about 65532 elements (printed, for comparison). burn's full
//! `sum`, which the blocked forms and the gradient norm rely on, is checked exact too.

use burn::backend::Wgpu;
use burn::tensor::{Int, Tensor, TensorData};
use dtopp::model::long_reductions::{column_means, column_sums, int_max, int_min, mean_of_all};

#[test]
fn blocked_reductions_past_the_loop_limit_on_wgpu_are_exact() {
    let Some(ops) = dtopp_tests::wgpu_or_skip() else {
        return;
    };
    println!("wgpu adapter: {}", ops.adapter_name());
    let device = Default::default();
    for n in [65_536usize, 72_000, 300_001] {
        // Small integers: every f32 sum below is exact, in any order.
        let values: Vec<i64> = (0..n * 3).map(|i| (i * 7919 % 11) as i64 - 5).collect();
        let column = |c: usize| values.iter().skip(c).step_by(3).copied();
        let want_sums: Vec<i64> = (0..3).map(|c| column(c).sum()).collect();
        let ints =
            Tensor::<Wgpu, 2, Int>::from_data(TensorData::new(values.clone(), [n, 3]), &device);
        let floats = ints.clone().float();
        let read_i = |t: Tensor<Wgpu, 1, Int>| -> Vec<i64> {
            t.into_data().convert::<i64>().to_vec().unwrap()
        };
        let read_f =
            |t: Tensor<Wgpu, 1>| -> Vec<f64> { t.into_data().convert::<f64>().to_vec().unwrap() };
        assert_eq!(
            read_i(column_sums(ints.clone())),
            want_sums,
            "n {n}: int sums"
        );
        let sums = read_f(column_sums(floats.clone()));
        assert_eq!(
            sums,
            want_sums.iter().map(|&s| s as f64).collect::<Vec<_>>(),
            "n {n}: sums"
        );
        let means = read_f(column_means(floats.clone()));
        for (m, &s) in means.iter().zip(&want_sums) {
            assert!(
                (m - s as f64 / n as f64).abs() < 1e-6,
                "n {n}: mean {m} vs {}",
                s as f64 / n as f64
            );
        }
        let all = want_sums.iter().sum::<i64>() as f64 / (3 * n) as f64;
        let mean = read_f(mean_of_all(floats.clone()))[0];
        assert!(
            (mean - all).abs() < 1e-6,
            "n {n}: mean of all {mean} vs {all}"
        );
        let full_sum = read_f(floats.clone().sum())[0];
        assert_eq!(
            full_sum,
            want_sums.iter().sum::<i64>() as f64,
            "n {n}: burn's sum"
        );
        // Ascending positions: the extreme sits at the far end, past any cut-off.
        let positions = Tensor::<Wgpu, 1, Int>::arange(0..n as i64, &device);
        assert_eq!(
            read_i(int_max(positions.clone())),
            vec![n as i64 - 1],
            "n {n}: max"
        );
        assert_eq!(
            read_i(int_min(positions.clone().neg())),
            vec![1 - n as i64],
            "n {n}: min"
        );
        println!(
            "n {n}: blocked exact; burn's own: mean_dim(0) {:?} (want {:?}), max {:?} (want {})",
            read_f(floats.mean_dim(0).reshape([3])),
            want_sums
                .iter()
                .map(|&s| s as f64 / n as f64)
                .collect::<Vec<_>>(),
            read_i(positions.max()),
            n - 1
        );
    }
}
