//! The CUDA C++ sources, compiled at run time by NVRTC (one module per file).

/// DRN forward/backward and the dL/dtheta sum.
pub const DRN: &str = include_str!("kernels/drn.cu");
/// Top-p and Top-k selection.
pub const SELECT: &str = include_str!("kernels/select.cu");
/// The dispatch plan (count, scan, scatter).
pub const DISPATCH: &str = include_str!("kernels/dispatch.cu");
/// Gather and combine.
pub const GATHER_COMBINE: &str = include_str!("kernels/gather_combine.cu");
/// The device-resident PI controller.
pub const CONTROLLER: &str = include_str!("kernels/controller.cu");

/// Every module: file name, source, and the kernels it defines.
pub const MODULES: [(&str, &str, &[&str]); 5] = [
    (
        "drn.cu",
        DRN,
        &["drn_forward", "drn_backward", "drn_theta_sum"],
    ),
    ("select.cu", SELECT, &["top_p", "top_k"]),
    (
        "dispatch.cu",
        DISPATCH,
        &["plan_count", "plan_scan", "plan_scatter"],
    ),
    ("gather_combine.cu", GATHER_COMBINE, &["gather", "combine"]),
    ("controller.cu", CONTROLLER, &["controller_update"]),
];
