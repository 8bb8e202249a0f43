//! The MoE language model on burn (feature `train`): the router's normalization (DRN) as
//! differentiable tensor ops, checked against the CPU reference's hand-derived backward;
//! the dropless MoE feed-forward block, its gradients checked against finite
//! differences; attention with RoPE; and the decoder-only model around them.

mod attention;
mod attention_ndarray;
mod attention_op;
mod config;
mod dense;
mod dense_matmul;
mod dense_matmul_ndarray;
mod device_memory;
mod device_routing;
pub(crate) mod drn;
pub(crate) mod grouped_matmul;
mod grouped_matmul_ndarray;
pub(crate) mod grouped_offsets;
mod grouped_routing;
mod init;
mod kv_cache;
mod layer_bounds;
mod lm;
pub mod long_reductions;
mod moe;
mod moe_layer;
pub(crate) mod ndarray_arrays;
mod padded_routing;
mod precision;
mod rms_norm;
mod rms_norm_ndarray;
mod rope;
mod rope_ndarray;
mod route;
pub(crate) mod routed_rows;
mod routing;
mod routing_backend;
mod swiglu;
mod swiglu_ndarray;
#[cfg(test)]
mod test_support;
mod token_embedding;
mod token_losses;
mod token_losses_ndarray;
mod tracked_pair;

pub use attention::CausalSelfAttention;
pub use attention_op::{AttentionBackend, causal_attention};
pub use config::ModelConfig;
pub use dense::DenseFfn;
pub use dense_matmul::DenseMatmulBackend;
pub use device_memory::{DeviceMemory, DeviceMemoryBackend};
pub use device_routing::non_finite_logit;
pub(crate) use device_routing::read_ints;
pub use device_routing::{route_on_device, select as select_on_device};
pub use drn::{DrnBackend, drn_backward_ops, drn_probs};
pub use grouped_matmul::GroupedMatmulBackend;
pub use grouped_offsets::grouped_on_device;
pub use grouped_routing::{RowBound, route_grouped};
pub use kv_cache::KvCache;
pub use layer_bounds::{LayerBounds, LayerNeeds};
pub use lm::{Block, LmOutput, MoeLanguageModel, RoutingPlan};
pub use moe::{LayerCounts, LayerRouting, MoeForward, MoeWeights, moe_forward};
pub use moe_layer::MoeLayer;
pub use padded_routing::{ExpertBounds, PaddedUsage, route_padded};
pub use precision::Precision;
pub use rms_norm::{RmsNormBackend, rms_norm};
pub use rope::RopeBackend;
pub use route::{ExpertRows, Route};
pub use routed_rows::RowMovesBackend;
pub use routing::{ExpertLayout, Selector};
#[cfg(feature = "wgpu")]
pub use routing_backend::wgpu as wgpu_routing;
pub use routing_backend::{RoutingBackend, TrainingBackend};
pub use swiglu::{SwigluBackend, swiglu};
pub use token_embedding::{embed_host_tokens, embed_tokens};
pub use token_losses::TokenLossesBackend;
