//! The token embedding's lookup on burn-wgpu with more positions than lavapipe runs loop
//! iterations (65535): its gradient is a tree of gathers (`core/src/model/
//! token_embedding.rs`), where burn's own scatter would lose the positions past the
//! limit. Checked against exact (f64) sums on wgpu and on burn ndarray.

use burn::backend::{Autodiff, NdArray, Wgpu};
use burn::tensor::{Int, Tensor, TensorData};
use dtopp::model::{RowMovesBackend, embed_host_tokens, embed_tokens};
use dtopp::rng::SplitMix64;

/// Positions, vocabulary (not a power of two; the last 3 tokens never occur), width.
const N: usize = 70_000;
const V: usize = 97;
const D: usize = 4;

struct Values {
    table: Vec<f32>,
    tokens: Vec<i64>,
    out_w: Vec<f32>,
}

fn values() -> Values {
    let mut rng = SplitMix64::new(8);
    let table = (0..V * D).map(|_| rng.normal() as f32).collect();
    // Skewed like a corpus: token 0 takes about a fifth of the positions (five passes).
    let tokens = (0..N)
        .map(|_| (rng.uniform().powi(4) * (V - 3) as f64) as i64)
        .collect();
    let out_w = (0..N * D).map(|_| rng.normal() as f32).collect();
    Values {
        table,
        tokens,
        out_w,
    }
}

/// The lookup's rows and the table's gradient under `sum(rows * out_w)`, the tokens also
/// given on the host or not.
fn run<B: RowMovesBackend>(v: &Values, host: bool) -> (Vec<f32>, Vec<f32>) {
    let device = Default::default();
    let table =
        Tensor::<Autodiff<B>, 2>::from_data(TensorData::new(v.table.clone(), [V, D]), &device)
            .require_grad();
    let tokens =
        Tensor::<Autodiff<B>, 1, Int>::from_data(TensorData::new(v.tokens.clone(), [N]), &device);
    let out_w =
        Tensor::<Autodiff<B>, 2>::from_data(TensorData::new(v.out_w.clone(), [N, D]), &device);
    let rows = if host {
        embed_host_tokens(table.clone(), tokens, &v.tokens)
    } else {
        embed_tokens(table.clone(), tokens)
    };
    let grads = (rows.clone() * out_w).sum().backward();
    let grad = table.grad(&grads).unwrap().into_data().to_vec().unwrap();
    (rows.into_data().to_vec().unwrap(), grad)
}

fn check(backend: &str, v: &Values, rows: &[f32], grad: &[f32]) {
    for (i, &t) in v.tokens.iter().enumerate() {
        let t = t as usize;
        assert_eq!(
            rows[i * D..(i + 1) * D],
            v.table[t * D..(t + 1) * D],
            "{backend}: row {i}"
        );
    }
    let mut exact = vec![0f64; V * D];
    let mut magnitude = vec![0f64; V * D];
    for (i, &t) in v.tokens.iter().enumerate() {
        for c in 0..D {
            let w = f64::from(v.out_w[i * D + c]);
            exact[t as usize * D + c] += w;
            magnitude[t as usize * D + c] += w.abs();
        }
    }
    // Any order of f32 additions stays within log2(N) eps of the magnitude; one lost
    // position moves a sum by about 1.
    for k in 0..V * D {
        let err = (f64::from(grad[k]) - exact[k]).abs();
        assert!(
            err <= 1e-5 * magnitude[k] + 1e-6,
            "{backend}: d/dtable[{}, {}] = {} vs {} (sum |terms| {})",
            k / D,
            k % D,
            grad[k],
            exact[k],
            magnitude[k]
        );
    }
}

#[test]
fn token_embedding_past_the_loop_limit_on_wgpu_is_exact() {
    let v = values();
    let seen = v.tokens.iter().filter(|&&t| t == 0).count();
    assert!(
        seen > 8 * 8 * 8 * 8,
        "{seen} positions of token 0: five passes"
    );
    let (rows, grad) = run::<NdArray>(&v, false);
    check("ndarray", &v, &rows, &grad);
    // The device set up for dtopp's kernels: the gradient's sums run `rows.wgsl`.
    if dtopp_tests::wgpu_model_device().is_none() {
        return;
    }
    println!("{N} positions, token 0 at {seen}");
    for host in [false, true] {
        let (rows, grad) = run::<Wgpu>(&v, host);
        check(&format!("wgpu (host tokens: {host})"), &v, &rows, &grad);
    }
}
