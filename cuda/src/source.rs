//! The CUDA C++ sources, compiled at run time by NVRTC (one module per file).

/// Device helpers shared by the warp-per-token kernels; pasted into each module that
/// includes it (NVRTC compiles from memory and cannot open the file).
pub const COMMON: &str = include_str!("kernels/common.cuh");
/// DRN forward/backward and the dL/dtheta sum.
pub const DRN: &str = include_str!("kernels/drn.cu");
/// Top-p and Top-k selection.
pub const SELECT: &str = include_str!("kernels/select.cu");
/// DRN and selection fused, one pass per token (E <= 256).
pub const ROUTE: &str = include_str!("kernels/route.cu");
/// The dispatch plan (count, scan, scatter).
pub const DISPATCH: &str = include_str!("kernels/dispatch.cu");
/// Gather and combine.
pub const GATHER_COMBINE: &str = include_str!("kernels/gather_combine.cu");
/// The row moves of training's MoE layers (gathers and slot sums, as rows.wgsl).
pub const ROWS: &str = include_str!("kernels/rows.cu");
/// The device-resident PI controller.
pub const CONTROLLER: &str = include_str!("kernels/controller.cu");
/// The experts' grouped products, offsets read on the device (f32, and bf16/f16 on the
/// tensor cores).
pub const GROUPED_MATMUL: &str = include_str!("kernels/grouped_matmul.cu");

/// The line a `.cu` file uses to include [`COMMON`].
const INCLUDE_COMMON: &str = "#include \"common.cuh\"";

/// Every module: file name, source, and the kernels it defines.
pub const MODULES: [(&str, &str, &[&str]); 8] = [
    (
        "drn.cu",
        DRN,
        &["drn_forward", "drn_backward", "drn_theta_sum"],
    ),
    ("select.cu", SELECT, &["top_p", "top_k"]),
    (
        "route.cu",
        ROUTE,
        &[
            "drn_select_r1",
            "drn_select_r2",
            "drn_select_r4",
            "drn_select_r8",
        ],
    ),
    (
        "dispatch.cu",
        DISPATCH,
        &["plan_count", "plan_scan", "plan_scatter"],
    ),
    ("gather_combine.cu", GATHER_COMBINE, &["gather", "combine"]),
    (
        "rows.cu",
        ROWS,
        &["gather_rows", "sum_rows", "sum_rows_weighted", "row_dots"],
    ),
    ("controller.cu", CONTROLLER, &["controller_update"]),
    (
        "grouped_matmul.cu",
        GROUPED_MATMUL,
        &[
            "grouped_forward_f32",
            "grouped_forward_bf16",
            "grouped_forward_f16",
            "grouped_weight_grad_f32",
        ],
    ),
];

/// A module's source as NVRTC compiles it: the `#include "common.cuh"` line replaced by
/// the header's text.
pub fn expanded(source: &str) -> String {
    source.replace(INCLUDE_COMMON, COMMON)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn includes_are_expanded() {
        for (file, src, _) in MODULES {
            let text = expanded(src);
            let includes = text.lines().any(|l| l.trim_start().starts_with("#include"));
            assert!(!includes, "{file} still includes a file");
        }
        assert!(expanded(ROUTE).contains("__device__ __forceinline__ void warp_best"));
    }
}
