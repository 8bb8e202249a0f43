//! The host-side bounds a MoE layer's rows are laid out in when nothing is read back per
//! layer: the padded layout's per-expert buffers or the grouped layout's row bound. The
//! trainer sizes them from earlier counts and redoes a micro-batch that outgrew them.

use super::grouped_routing::RowBound;
use super::padded_routing::ExpertBounds;
use super::routing::{ExpertLayout, Selector};

/// One MoE layer's bounds, in the layout they belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerBounds {
    /// [`ExpertLayout::Padded`]: `C` rows per expert, `S` slots per token.
    Padded(ExpertBounds),
    /// [`ExpertLayout::Grouped`]: `R` rows in all, `S` slots per token.
    Grouped(RowBound),
}

impl From<ExpertBounds> for LayerBounds {
    fn from(b: ExpertBounds) -> Self {
        LayerBounds::Padded(b)
    }
}

impl From<RowBound> for LayerBounds {
    fn from(b: RowBound) -> Self {
        LayerBounds::Grouped(b)
    }
}

/// What one layer's routing of a micro-batch needs: its routes (`k` summed over the
/// tokens), its busiest expert's routes and its busiest token's experts.
#[derive(Clone, Copy, Debug)]
pub struct LayerNeeds {
    pub routes: usize,
    pub max_load: usize,
    pub max_k: usize,
}

impl LayerBounds {
    /// Bounds in `layout` for the next micro-batch of `tokens` tokens after one that
    /// needed `needs`, for a layer routed by `selector` over `experts` experts; `None` in
    /// the exact layout, which needs none.
    pub fn after(
        layout: ExpertLayout,
        needs: LayerNeeds,
        tokens: usize,
        experts: usize,
        selector: Selector,
    ) -> Option<Self> {
        match layout {
            ExpertLayout::Exact => None,
            ExpertLayout::Padded => Some(LayerBounds::Padded(ExpertBounds::after(
                needs.max_load,
                needs.max_k,
                tokens,
                experts,
            ))),
            ExpertLayout::Grouped => Some(LayerBounds::Grouped(RowBound::after(
                needs.routes,
                needs.max_k,
                tokens,
                selector.k_bound(experts),
            ))),
        }
    }

    /// Whether a micro-batch with these needs fits.
    pub fn hold(&self, needs: LayerNeeds) -> bool {
        match self {
            LayerBounds::Padded(b) => b.hold(needs.max_load, needs.max_k),
            LayerBounds::Grouped(b) => b.hold(needs.routes, needs.max_k),
        }
    }

    /// Expert rows the layer allocates: `E C` padded, `R` grouped.
    pub fn allocated_rows(&self, experts: usize) -> usize {
        match self {
            LayerBounds::Padded(b) => experts * b.capacity,
            LayerBounds::Grouped(b) => b.rows,
        }
    }

    /// Expert rows the experts' products compute for `routes` routes: every buffer row
    /// padded (one batched product), only the routes grouped (rows past them are
    /// written as zeros without arithmetic).
    pub fn computed_rows(&self, experts: usize, routes: usize) -> usize {
        match self {
            LayerBounds::Padded(b) => experts * b.capacity,
            LayerBounds::Grouped(_) => routes,
        }
    }
}
