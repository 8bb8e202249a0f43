//! What a device kernel crate offers the generic device backend ([`super::DeviceOps`]):
//! buffers, transfers, and one launcher per routing op with the same arguments on every
//! device. `dtopp-shaders` (WGSL through wgpu) and `dtopp-cuda` (CUDA through cudarc)
//! implement it; their errors become [`crate::Error::Backend`] naming the backend.

use crate::error::Result;

/// The buffers a selection kernel writes.
#[derive(Clone, Debug)]
pub struct SelectionBuffers<B> {
    /// `[N, E]` i32.
    pub experts: B,
    /// `[N, E]` f32.
    pub weights: B,
    /// `[N]` i32.
    pub counts: B,
    /// `[1]` u32: index of the first non-finite probability, or `u32::MAX`.
    pub status: B,
}

/// The buffers of DRN and selection run together ([`KernelSet::drn_select`]).
#[derive(Clone, Debug)]
pub struct RoutedBuffers<B> {
    /// `[N, E]` f32 probabilities.
    pub probs: B,
    /// `[1]` u32: index of the first non-finite logit, or `u32::MAX`.
    pub logit_status: B,
    /// The selection; its status names the first non-finite probability.
    pub selection: SelectionBuffers<B>,
}

/// Which experts a selection keeps.
#[derive(Clone, Copy, Debug)]
pub enum Keep<'a, B> {
    /// Top-p at `p = threshold[0]`, at most `k_max` experts.
    TopP {
        /// A device buffer whose first value is `p`.
        threshold: &'a B,
        /// The cap, if any.
        k_max: Option<usize>,
    },
    /// The `k` top-ranked experts.
    TopK(usize),
}

/// The buffers of a dispatch plan (see [`crate::ops::DispatchPlan`]).
#[derive(Clone, Debug)]
pub struct PlanBuffers<B> {
    /// `[E]` i32.
    pub expert_counts: B,
    /// `[E + 1]` i32.
    pub expert_offsets: B,
    /// `[capacity]` i32.
    pub route_tokens: B,
    /// `[capacity]` f32.
    pub route_weights: B,
    /// `[N, E]` i32.
    pub token_routes: B,
}

/// The routing kernels of one device.
#[allow(clippy::too_many_arguments)]
pub trait KernelSet {
    /// A device buffer of 4-byte values (f32, i32 or u32 by use), cheap to clone.
    type Buffer: Clone + std::fmt::Debug;
    /// The backend's name in messages (`"wgpu"`, `"cuda"`).
    const NAME: &'static str;

    /// A buffer holding `data` (4-byte values).
    fn upload<T: bytemuck::Pod>(&self, what: &str, data: &[T]) -> Result<Self::Buffer>;
    /// The first `len` values of a buffer (waits for the device).
    fn read<T: bytemuck::Pod>(&self, buffer: &Self::Buffer, len: usize) -> Result<Vec<T>>;
    /// Waits until every launched kernel has finished.
    fn synchronize(&self) -> Result<()>;
    /// DRN (`theta: Some`) or softmax: probabilities and a status buffer.
    fn drn_forward(
        &self,
        logits: &Self::Buffer,
        tokens: usize,
        experts: usize,
        theta: Option<f32>,
    ) -> Result<(Self::Buffer, Self::Buffer)>;
    /// dL/dz, dL/dtheta and a status buffer.
    fn drn_backward(
        &self,
        logits: &Self::Buffer,
        probs: &Self::Buffer,
        grad_probs: &Self::Buffer,
        tokens: usize,
        experts: usize,
        theta: Option<f32>,
    ) -> Result<(Self::Buffer, Self::Buffer, Self::Buffer)>;
    /// Top-p with `p = threshold[0]`.
    fn top_p(
        &self,
        probs: &Self::Buffer,
        tokens: usize,
        experts: usize,
        threshold: &Self::Buffer,
        k_max: Option<usize>,
    ) -> Result<SelectionBuffers<Self::Buffer>>;
    /// Top-k.
    fn top_k(
        &self,
        probs: &Self::Buffer,
        tokens: usize,
        experts: usize,
        k: usize,
    ) -> Result<SelectionBuffers<Self::Buffer>>;
    /// DRN (or softmax) then selection. Kernel sets that fuse the two override it;
    /// the default launches [`KernelSet::drn_forward`] and the selection kernel.
    fn drn_select(
        &self,
        logits: &Self::Buffer,
        tokens: usize,
        experts: usize,
        theta: Option<f32>,
        keep: Keep<'_, Self::Buffer>,
    ) -> Result<RoutedBuffers<Self::Buffer>> {
        self.drn_then_select(logits, tokens, experts, theta, keep)
    }
    /// [`KernelSet::drn_select`] as two kernels.
    fn drn_then_select(
        &self,
        logits: &Self::Buffer,
        tokens: usize,
        experts: usize,
        theta: Option<f32>,
        keep: Keep<'_, Self::Buffer>,
    ) -> Result<RoutedBuffers<Self::Buffer>> {
        let (probs, logit_status) = self.drn_forward(logits, tokens, experts, theta)?;
        let selection = match keep {
            Keep::TopP { threshold, k_max } => {
                self.top_p(&probs, tokens, experts, threshold, k_max)?
            }
            Keep::TopK(k) => self.top_k(&probs, tokens, experts, k)?,
        };
        Ok(RoutedBuffers {
            probs,
            logit_status,
            selection,
        })
    }
    /// Whether [`KernelSet::drn_select`] is one kernel for this many experts (benchmarks
    /// count launches with it).
    fn fuses_drn_select(&self, experts: usize) -> bool {
        let _ = experts;
        false
    }
    /// The dispatch plan of a selection, route arrays of `capacity`.
    fn dispatch_plan(
        &self,
        experts_sel: &Self::Buffer,
        weights_sel: &Self::Buffer,
        counts_sel: &Self::Buffer,
        tokens: usize,
        experts: usize,
        capacity: usize,
    ) -> Result<PlanBuffers<Self::Buffer>>;
    /// `out[m] = x[route_tokens[m]]` for `rows` routes.
    fn gather(
        &self,
        x: &Self::Buffer,
        hidden: usize,
        plan: &PlanBuffers<Self::Buffer>,
        rows: usize,
        experts: usize,
    ) -> Result<Self::Buffer>;
    /// `out[i] = sum_s route_weights[m] y[m]` for `rows` tokens.
    fn combine(
        &self,
        y: &Self::Buffer,
        hidden: usize,
        plan: &PlanBuffers<Self::Buffer>,
        rows: usize,
        experts: usize,
    ) -> Result<Self::Buffer>;
    /// One PI update of the device-resident `state`.
    fn controller_update(
        &self,
        state: &Self::Buffer,
        counts: &Self::Buffer,
        len: usize,
        experts: usize,
        target: f32,
        gains: (f32, f32),
        clamps: (f32, f32),
    ) -> Result<()>;
}

/// Implements [`KernelSet`] for a kernel crate whose launchers have the trait's
/// arguments and return its own `SelectionBuffers` / `DispatchBuffers` (same fields) and
/// error type; `read` and `synchronize` are given as functions (they differ by platform),
/// and so is a fused `drn_select` with its `fuses_drn_select`, where the crate has one.
macro_rules! forward_kernel_set {
    (
        $kernels:ty, buffer: $buffer:ty, name: $name:literal,
        selection: $sel:path, plan: $plan:path,
        read: $read:path, synchronize: $sync:path
        $(, fused: ($fused:path, $fuses:path))? $(,)?
    ) => {
        impl $crate::backends::kernel_set::KernelSet for $kernels {
            type Buffer = $buffer;
            const NAME: &'static str = $name;

            fn upload<T: bytemuck::Pod>(&self, what: &str, data: &[T]) -> $crate::Result<$buffer> {
                <$kernels>::upload(self, what, data).map_err(|e| backend_error(&e))
            }

            fn read<T: bytemuck::Pod>(
                &self,
                buffer: &$buffer,
                len: usize,
            ) -> $crate::Result<Vec<T>> {
                $read(self, buffer, len)
            }

            fn synchronize(&self) -> $crate::Result<()> {
                $sync(self)
            }

            fn drn_forward(
                &self,
                logits: &$buffer,
                tokens: usize,
                experts: usize,
                theta: Option<f32>,
            ) -> $crate::Result<($buffer, $buffer)> {
                <$kernels>::drn_forward(self, logits, tokens, experts, theta)
                    .map_err(|e| backend_error(&e))
            }

            fn drn_backward(
                &self,
                logits: &$buffer,
                probs: &$buffer,
                grad_probs: &$buffer,
                tokens: usize,
                experts: usize,
                theta: Option<f32>,
            ) -> $crate::Result<($buffer, $buffer, $buffer)> {
                <$kernels>::drn_backward(self, logits, probs, grad_probs, tokens, experts, theta)
                    .map_err(|e| backend_error(&e))
            }

            fn top_p(
                &self,
                probs: &$buffer,
                tokens: usize,
                experts: usize,
                threshold: &$buffer,
                k_max: Option<usize>,
            ) -> $crate::Result<$crate::backends::kernel_set::SelectionBuffers<$buffer>> {
                <$kernels>::top_p(self, probs, tokens, experts, threshold, k_max)
                    .map(|s| selection_of(s))
                    .map_err(|e| backend_error(&e))
            }

            fn top_k(
                &self,
                probs: &$buffer,
                tokens: usize,
                experts: usize,
                k: usize,
            ) -> $crate::Result<$crate::backends::kernel_set::SelectionBuffers<$buffer>> {
                <$kernels>::top_k(self, probs, tokens, experts, k)
                    .map(|s| selection_of(s))
                    .map_err(|e| backend_error(&e))
            }

            fn dispatch_plan(
                &self,
                experts_sel: &$buffer,
                weights_sel: &$buffer,
                counts_sel: &$buffer,
                tokens: usize,
                experts: usize,
                capacity: usize,
            ) -> $crate::Result<$crate::backends::kernel_set::PlanBuffers<$buffer>> {
                <$kernels>::dispatch_plan(
                    self,
                    experts_sel,
                    weights_sel,
                    counts_sel,
                    tokens,
                    experts,
                    capacity,
                )
                .map(|p| $crate::backends::kernel_set::PlanBuffers {
                    expert_counts: p.expert_counts,
                    expert_offsets: p.expert_offsets,
                    route_tokens: p.route_tokens,
                    route_weights: p.route_weights,
                    token_routes: p.token_routes,
                })
                .map_err(|e| backend_error(&e))
            }

            fn gather(
                &self,
                x: &$buffer,
                hidden: usize,
                plan: &$crate::backends::kernel_set::PlanBuffers<$buffer>,
                rows: usize,
                experts: usize,
            ) -> $crate::Result<$buffer> {
                <$kernels>::gather(self, x, hidden, &plan_of(plan), rows, experts)
                    .map_err(|e| backend_error(&e))
            }

            fn combine(
                &self,
                y: &$buffer,
                hidden: usize,
                plan: &$crate::backends::kernel_set::PlanBuffers<$buffer>,
                rows: usize,
                experts: usize,
            ) -> $crate::Result<$buffer> {
                <$kernels>::combine(self, y, hidden, &plan_of(plan), rows, experts)
                    .map_err(|e| backend_error(&e))
            }

            $(
            fn drn_select(
                &self,
                logits: &$buffer,
                tokens: usize,
                experts: usize,
                theta: Option<f32>,
                keep: $crate::backends::kernel_set::Keep<'_, $buffer>,
            ) -> $crate::Result<$crate::backends::kernel_set::RoutedBuffers<$buffer>> {
                $fused(self, logits, tokens, experts, theta, keep)
            }

            fn fuses_drn_select(&self, experts: usize) -> bool {
                $fuses(self, experts)
            }
            )?

            fn controller_update(
                &self,
                state: &$buffer,
                counts: &$buffer,
                len: usize,
                experts: usize,
                target: f32,
                gains: (f32, f32),
                clamps: (f32, f32),
            ) -> $crate::Result<()> {
                <$kernels>::controller_update(
                    self, state, counts, len, experts, target, gains, clamps,
                )
                .map_err(|e| backend_error(&e))
            }
        }

        fn selection_of(s: $sel) -> $crate::backends::kernel_set::SelectionBuffers<$buffer> {
            $crate::backends::kernel_set::SelectionBuffers {
                experts: s.experts,
                weights: s.weights,
                counts: s.counts,
                status: s.status,
            }
        }

        fn plan_of(p: &$crate::backends::kernel_set::PlanBuffers<$buffer>) -> $plan {
            $plan {
                expert_counts: p.expert_counts.clone(),
                expert_offsets: p.expert_offsets.clone(),
                route_tokens: p.route_tokens.clone(),
                route_weights: p.route_weights.clone(),
                token_routes: p.token_routes.clone(),
            }
        }

        fn backend_error(e: &dyn std::fmt::Display) -> $crate::Error {
            $crate::Error::Backend {
                backend: $name,
                message: e.to_string(),
            }
        }
    };
}

pub(crate) use forward_kernel_set;
