//! What a MoE layer is told about routing: the selector, and the layout its experts'
//! rows take. Selection and the dispatch plan always run through the backend's routing
//! ops ([`super::RoutingBackend`]) on the model's own tensors: dtopp's WGSL on burn-wgpu's
//! buffers, the fast CPU ops on burn ndarray, burn tensor ops elsewhere. There is no host
//! copy of the probabilities and no second implementation.

use super::routing_backend::RoutingBackend;

/// How experts are selected.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Selector {
    /// The `k` most probable experts.
    TopK(usize),
    /// Top-p at `threshold`, optionally capped at `k_max`.
    TopP {
        /// `p` in (0, 1].
        threshold: f32,
        /// Cap on experts per token.
        k_max: Option<usize>,
    },
}

impl Selector {
    /// The most experts a token can take among `experts`: Top-k's `k`, or Top-p's cap,
    /// else E; at least 1 (the device plans size their route arrays by `N` times it).
    pub fn k_bound(self, experts: usize) -> usize {
        match self {
            Selector::TopK(k) => k,
            Selector::TopP { k_max, .. } => k_max.unwrap_or(experts),
        }
        .clamp(1, experts.max(1))
    }
}

/// How the routed rows are laid out for the experts' products. The layouts make the
/// same selection and the same outputs (`tests/tests/bounded_layouts.rs`); they differ in
/// what the host must know, and so in how often it waits for the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum ExpertLayout {
    /// Each expert on the exact, contiguous slice of its routes. burn's matrix products
    /// take the slices' shapes from the host, so it reads the plan's head (`E + 4`
    /// integers) per layer. The cheaper layout where reading is free (a CPU).
    #[default]
    Exact,
    /// Each expert on a buffer of rows sized from the previous step, all in one batched
    /// product: nothing is read per layer; in a single-process run the controller runs
    /// on the device and the host reads once per optimizer step. A micro-batch that
    /// outgrows its buffers runs again, so nothing is dropped.
    Padded,
    /// Each route on exactly one expert row, expert-major, with the experts' offsets on
    /// the device where the grouped products read them: nothing is read per layer and
    /// no padding is computed. The host bounds the total rows from the previous step; a
    /// micro-batch that outgrows the bound runs again, so nothing is dropped. Without a
    /// grouped kernel on the backend (CUDA today) its products read the offsets back.
    Grouped,
}

impl ExpertLayout {
    /// The layout a run on backend `B` takes unless told otherwise: exact on host
    /// memory (reading is free); on a device the host must wait for, grouped where the
    /// backend's grouped products read device offsets, else padded.
    pub fn preferred_on<B: RoutingBackend>() -> Self {
        if B::HOST_MEMORY {
            ExpertLayout::Exact
        } else if B::device_offsets() {
            ExpertLayout::Grouped
        } else {
            ExpertLayout::Padded
        }
    }

    /// Whether the layout runs on host bounds ([`super::LayerBounds`]) with nothing read
    /// per layer.
    pub fn bounded(self) -> bool {
        self != ExpertLayout::Exact
    }

    /// The layout's name as `--layout` spells it.
    pub fn name(self) -> &'static str {
        match self {
            ExpertLayout::Exact => "exact",
            ExpertLayout::Padded => "padded",
            ExpertLayout::Grouped => "grouped",
        }
    }

    /// What routes and how the rows are laid out on `device`, for the log.
    pub fn describe_on<B: RoutingBackend>(self, device: &B::Device) -> String {
        let layout = match self {
            ExpertLayout::Exact => "experts on exact slices (the plan's head read per layer)",
            ExpertLayout::Padded => "experts in padded buffers (nothing read per layer)",
            ExpertLayout::Grouped if B::device_offsets() => {
                "experts on their exact rows, grouped products reading the offsets on the device (nothing read per layer)"
            }
            ExpertLayout::Grouped => {
                "experts on their exact rows; this backend's grouped products read the offsets back (one read per product)"
            }
        };
        format!("{}; {layout}", B::routing_name(device))
    }
}
