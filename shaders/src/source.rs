//! The WGSL sources, one file per op family, embedded at build time. The same text runs
//! on native wgpu, in burn-wgpu's device and in the browser.

/// `drn.wgsl`: DRN forward, backward and the dtheta sum.
pub const DRN: &str = include_str!("wgsl/drn.wgsl");
/// `select.wgsl`: Top-p and Top-k selection.
pub const SELECT: &str = include_str!("wgsl/select.wgsl");
/// `dispatch.wgsl`: the dispatch plan (count, scan, scatter).
pub const DISPATCH: &str = include_str!("wgsl/dispatch.wgsl");
/// `gather_combine.wgsl`: gather of token rows and per-token combine.
pub const GATHER_COMBINE: &str = include_str!("wgsl/gather_combine.wgsl");
/// `rows.wgsl`: training's row moves (gather, slot sums, row dots) and their gradients.
pub const ROWS: &str = include_str!("wgsl/rows.wgsl");
/// `controller.wgsl`: the device-resident PI controller update.
pub const CONTROLLER: &str = include_str!("wgsl/controller.wgsl");

/// `grouped_matmul.wgsl`: the experts' grouped products, offsets read on the device.
pub const GROUPED_MATMUL: &str = include_str!("wgsl/grouped_matmul.wgsl");

/// Every shader with its file name, for validation and tooling.
pub const ALL: &[(&str, &str)] = &[
    ("drn.wgsl", DRN),
    ("select.wgsl", SELECT),
    ("dispatch.wgsl", DISPATCH),
    ("gather_combine.wgsl", GATHER_COMBINE),
    ("rows.wgsl", ROWS),
    ("controller.wgsl", CONTROLLER),
    ("grouped_matmul.wgsl", GROUPED_MATMUL),
];
