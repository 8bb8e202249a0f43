//! The MoE model on burn (feature `train`). The trainer issue builds the transformer
//! here; what exists now is the router's normalization as differentiable tensor ops,
//! checked against the CPU reference's hand-derived backward.

mod drn;

pub use drn::drn_probs;
