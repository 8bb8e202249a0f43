//! The CUDA kernels against the CPU reference, on CUDA device 0. Without the `cuda`
//! feature, a driver, NVRTC or a device the tests skip and say why, unless
//! DTOPP_REQUIRE_GPU=1 (set on the GPU machine), which makes that a failure.

use dtopp::ops::{Normalization, RouteShape, RoutingOps};
use dtopp_tests::{assert_conforms, cases, cuda_or_skip};

#[test]
fn cuda_kernels_conform_to_the_cpu_reference() {
    let Some(ops) = cuda_or_skip() else { return };
    let started = std::time::Instant::now();
    assert_conforms(&ops, cases(2026));
    println!(
        "cuda conformance took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The fused kernel (route.cu) does drn_forward's and top_p's arithmetic operation for
/// operation, so its outputs equal the two-kernel path's bit for bit, on every register
/// width and on the fallback above 256 experts.
#[test]
fn fused_routing_equals_the_two_kernel_path_bit_for_bit() {
    let Some(ops) = cuda_or_skip() else { return };
    let mut compared = 0;
    for case in cases(7).into_iter().filter(|c| c.shape.tokens <= 1000) {
        let shape: RouteShape = case.shape;
        let logits = ops.upload_floats(&case.logits).unwrap();
        for norm in [Normalization::Drn { theta: 1.7 }, Normalization::Softmax] {
            for (p, k_max) in [(0.3f32, None), (0.95, Some(shape.experts.div_ceil(2)))] {
                let threshold = ops.upload_floats(&[p]).unwrap();
                let probs = ops.drn_forward(&logits, shape, norm).unwrap();
                let two = ops.top_p(&probs, shape, &threshold, k_max).unwrap();
                let fused = ops
                    .drn_top_p(&logits, shape, norm, &threshold, k_max)
                    .unwrap();
                let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
                let what = format!("{} {norm:?} p={p} k_max={k_max:?}", case.name);
                assert_eq!(
                    bits(ops.read_floats(&fused.probs).unwrap()),
                    bits(ops.read_floats(&probs).unwrap()),
                    "{what}: probabilities"
                );
                let (f, t) = (
                    ops.read_selection(&fused.selection).unwrap(),
                    ops.read_selection(&two).unwrap(),
                );
                assert_eq!(f.counts, t.counts, "{what}: counts");
                assert_eq!(f.experts, t.experts, "{what}: experts");
                assert_eq!(bits(f.weights), bits(t.weights), "{what}: weights");
                compared += 1;
            }
        }
    }
    println!("fused == two kernels, bit for bit, in {compared} comparisons");
}

#[test]
fn without_the_backend_the_error_names_what_is_missing() {
    if cuda_or_skip().is_some() {
        return;
    }
    let err = dtopp::backends::CudaOps::new(0).unwrap_err().to_string();
    assert!(
        err.contains("backend cuda")
            && (err.contains("not in this build")
                || err.contains("libcuda")
                || err.contains("libnvrtc")
                || err.contains("no CUDA device")),
        "{err}"
    );
}

#[test]
fn the_cli_names_what_the_cuda_backend_lacks_and_writes_nothing() {
    if cuda_or_skip().is_some() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dtopp-cuda-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new(dtopp_tests::dtopp_binary())
        .args(["simulate", "--steps", "3", "--backend", "cuda", "--out"])
        .arg(dir.join("sim"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("error: backend cuda:"), "{err}");
    assert!(!dir.join("sim/metrics.jsonl").exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// `grouped_matmul.cu` against the f64 reference (`dtopp_tests::grouped`): the f32
/// kernels within the WGSL test's tolerance, the bf16 and f16 tensor-core kernels within
/// what rounding both operands to 8 (bf16) or 11 (f16) significant bits allows:
/// `|got - want| <= tol (1 + |want|) + 4 tol sqrt(K)` with tol = 2^-8 or 2^-11.
#[test]
fn grouped_matmul_kernels_conform_to_the_cpu_reference() {
    use dtopp::backends::GemmPrecision;
    use dtopp::rng::SplitMix64;
    use dtopp_tests::grouped::{assert_close, cases, normals, offsets, reference};

    let Some(ops) = cuda_or_skip() else { return };
    let k = ops.kernels();
    let mut rng = SplitMix64::new(24);
    for c in cases() {
        let (d, f, e) = (c.d, c.f, c.counts.len());
        let (x, w, up) = (
            normals(&mut rng, c.rows * d),
            normals(&mut rng, e * d * f),
            normals(&mut rng, c.rows * f),
        );
        let (want_y, want_dx, want_dw) = reference(&c, &x, &w, &up);
        let what = format!("counts {:?}, rows {}, D {d}, F {f}", c.counts, c.rows);
        let routes = c.counts.iter().sum::<usize>();
        let up_load = |data: &[f32]| k.upload("grouped test", data).unwrap();
        let (xb, wb, gb) = (up_load(&x), up_load(&w), up_load(&up));
        let ob = k.upload("grouped test", &offsets(&c.counts)).unwrap();
        for precision in [GemmPrecision::F32, GemmPrecision::Bf16, GemmPrecision::F16] {
            let dims = [c.rows, d, f, e];
            let y = k
                .grouped_matmul(&xb, &wb, &ob, dims, false, precision)
                .unwrap();
            let y: Vec<f32> = k.read(&y, c.rows * f).unwrap();
            // dX = g W^T: the transposed read of the same [E, D, F] weights.
            let dx = k
                .grouped_matmul(&gb, &wb, &ob, [c.rows, f, d, e], true, precision)
                .unwrap();
            let dx: Vec<f32> = k.read(&dx, c.rows * d).unwrap();
            let label = format!("{what} {precision:?}");
            match precision {
                GemmPrecision::F32 => {
                    assert_close(&y, &want_y, d, &format!("{label}: y"));
                    assert_close(&dx, &want_dx, f, &format!("{label}: dX"));
                }
                _ => {
                    let tol = if precision == GemmPrecision::Bf16 {
                        2f64.powi(-8)
                    } else {
                        2f64.powi(-11)
                    };
                    for (got, want, depth, name) in
                        [(&y, &want_y, d, "y"), (&dx, &want_dx, f, "dX")]
                    {
                        for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
                            let bound = tol * (1.0 + w.abs()) + 4.0 * tol * (depth as f64).sqrt();
                            assert!(
                                (f64::from(g) - w).abs() <= bound,
                                "{label}: {name}[{i}] kernel {g}, reference {w}"
                            );
                        }
                    }
                }
            }
            assert!(
                y[routes * f..].iter().all(|&v| v == 0.0),
                "{label}: y past the routes"
            );
        }
        let dw = k
            .grouped_weight_grad(&xb, &gb, &ob, [c.rows, d, f, e])
            .unwrap();
        let dw: Vec<f32> = k.read(&dw, e * d * f).unwrap();
        assert_close(&dw, &want_dw, routes, &format!("{what}: dW"));
    }
}
