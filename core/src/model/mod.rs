//! The MoE model on burn (feature `train`). The trainer issue builds the transformer
//! here; what exists now is the router's normalization as differentiable tensor ops,
//! checked against the CPU reference's hand-derived backward, and the dropless MoE
//! feed-forward block, its gradients checked against finite differences.

mod drn;
mod moe;

pub use drn::drn_probs;
pub use moe::{MoeForward, MoeWeights, Selector, moe_forward};
