//! The routing ops on any device kernel set (the WGSL kernels of `dtopp-shaders`, the
//! CUDA kernels of `dtopp-cuda`): one implementation of the ops contract, the argument
//! checks and the non-finite bookkeeping, over [`KernelSet`].
//!
//! Buffers stay on the device between ops; nothing waits for the device until a result
//! is read. Non-finite inputs are recorded by the kernels in status buffers that travel
//! with every result computed from them, and are reported when such a result is read.

use super::kernel_set::{Keep, KernelSet, PlanBuffers, RoutedBuffers, SelectionBuffers};
use crate::controller::{ControllerConfig, DEVICE_STATE_LEN};
use crate::error::{Error, Result};
use crate::ops::{
    DispatchPlan, DrnGrads, Normalization, RouteShape, Routed, RoutingOps, Selection,
};

/// A non-finite input check recorded by a kernel: `status[0]` is the first offending
/// row-major index of `source` (`u32::MAX` if none).
#[derive(Clone, Debug)]
pub(crate) struct FiniteCheck<B> {
    pub(crate) status: B,
    pub(crate) source: B,
    pub(crate) op: &'static str,
    pub(crate) what: &'static str,
    pub(crate) width: usize,
}

impl<B> FiniteCheck<B> {
    /// The error for the non-finite `value` found at row-major index `at`.
    pub(crate) fn error(&self, at: usize, value: f32) -> Error {
        Error::NonFinite {
            op: self.op,
            what: self.what,
            token: at / self.width,
            column: at % self.width,
            value,
        }
    }
}

/// A device buffer of `len` 4-byte values (f32 or i32, by use) and the non-finite checks
/// of everything it was computed from.
#[derive(Clone, Debug)]
pub struct GpuArray<B> {
    pub(crate) buffer: B,
    pub(crate) len: usize,
    pub(crate) checks: Vec<FiniteCheck<B>>,
}

impl<B: Clone> GpuArray<B> {
    /// The device buffer (for chaining with other kernels, e.g. the trainer's).
    pub fn buffer(&self) -> &B {
        &self.buffer
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn derived(
        buffer: B,
        len: usize,
        from: &[&GpuArray<B>],
        check: Option<FiniteCheck<B>>,
    ) -> Self {
        let mut checks: Vec<FiniteCheck<B>> =
            from.iter().flat_map(|a| a.checks.iter().cloned()).collect();
        checks.extend(check);
        Self {
            buffer,
            len,
            checks,
        }
    }
}

/// A device backend: the routing ops on one kernel set, compiled once for one device.
#[derive(Debug)]
pub struct DeviceOps<K> {
    pub(crate) kernels: K,
}

impl<K: KernelSet> DeviceOps<K> {
    /// The kernels, for callers that chain their own work.
    pub fn kernels(&self) -> &K {
        &self.kernels
    }

    fn read<T: bytemuck::Pod>(&self, buffer: &K::Buffer, len: usize) -> Result<Vec<T>> {
        self.kernels.read(buffer, len)
    }

    fn check(&self, array: &GpuArray<K::Buffer>) -> Result<()> {
        for c in &array.checks {
            let status: Vec<u32> = self.read(&c.status, 1)?;
            if status[0] != u32::MAX {
                let at = status[0] as usize;
                let values: Vec<f32> = self.read(&c.source, at + 1)?;
                return Err(c.error(at, values[at]));
            }
        }
        Ok(())
    }

    fn array(&self, buffer: K::Buffer, len: usize) -> GpuArray<K::Buffer> {
        GpuArray {
            buffer,
            len,
            checks: Vec::new(),
        }
    }

    fn check_len(
        op: &'static str,
        name: &str,
        a: &GpuArray<K::Buffer>,
        expected: usize,
    ) -> Result<()> {
        crate::ops::check_len(op, name, a.len, expected)
    }
}

impl<K: KernelSet> RoutingOps for DeviceOps<K> {
    type Floats = GpuArray<K::Buffer>;
    type Ints = GpuArray<K::Buffer>;

    fn backend_name(&self) -> &'static str {
        K::NAME
    }

    fn upload_floats(&self, data: &[f32]) -> Result<GpuArray<K::Buffer>> {
        let buffer = self.kernels.upload("upload", data)?;
        Ok(self.array(buffer, data.len()))
    }

    fn upload_ints(&self, data: &[i32]) -> Result<GpuArray<K::Buffer>> {
        let buffer = self.kernels.upload("upload", data)?;
        Ok(self.array(buffer, data.len()))
    }

    fn synchronize(&self) -> Result<()> {
        self.kernels.synchronize()
    }

    fn read_floats(&self, a: &GpuArray<K::Buffer>) -> Result<Vec<f32>> {
        self.check(a)?;
        crate::host_reads::count(1);
        self.read(&a.buffer, a.len)
    }

    fn read_ints(&self, a: &GpuArray<K::Buffer>) -> Result<Vec<i32>> {
        self.check(a)?;
        crate::host_reads::count(1);
        self.read(&a.buffer, a.len)
    }

    fn drn_forward(
        &self,
        logits: &GpuArray<K::Buffer>,
        shape: RouteShape,
        norm: Normalization,
    ) -> Result<GpuArray<K::Buffer>> {
        Self::check_len("drn_forward", "logits", logits, shape.len())?;
        let theta = norm.theta()?;
        let (probs, status) =
            self.kernels
                .drn_forward(&logits.buffer, shape.tokens, shape.experts, theta)?;
        Ok(Self::probs(probs, status, logits, shape))
    }

    fn drn_backward(
        &self,
        logits: &GpuArray<K::Buffer>,
        probs: &GpuArray<K::Buffer>,
        grad_probs: &GpuArray<K::Buffer>,
        shape: RouteShape,
        norm: Normalization,
    ) -> Result<DrnGrads<GpuArray<K::Buffer>>> {
        const OP: &str = "drn_backward";
        Self::check_len(OP, "logits", logits, shape.len())?;
        Self::check_len(OP, "probs", probs, shape.len())?;
        Self::check_len(OP, "grad_probs", grad_probs, shape.len())?;
        let theta = norm.theta()?;
        let (dz, dtheta, status) = self.kernels.drn_backward(
            &logits.buffer,
            &probs.buffer,
            &grad_probs.buffer,
            shape.tokens,
            shape.experts,
            theta,
        )?;
        // The kernel flags a non-finite logit or gradient in one status; logits are
        // checked by the forward already, so name the gradient.
        let check = FiniteCheck {
            status,
            source: grad_probs.buffer.clone(),
            op: OP,
            what: "gradient",
            width: shape.experts,
        };
        let from = [logits, probs, grad_probs];
        Ok(DrnGrads {
            logits: GpuArray::derived(dz, shape.len(), &from, Some(check.clone())),
            theta: GpuArray::derived(dtheta, 1, &from, Some(check)),
        })
    }

    fn top_p(
        &self,
        probs: &GpuArray<K::Buffer>,
        shape: RouteShape,
        threshold: &GpuArray<K::Buffer>,
        k_max: Option<usize>,
    ) -> Result<Selection<GpuArray<K::Buffer>, GpuArray<K::Buffer>>> {
        Self::check_len("top_p", "probs", probs, shape.len())?;
        if threshold.is_empty() {
            return Err(Error::shape("top_p", "threshold buffer is empty"));
        }
        crate::ops::check_k_max(k_max, shape.experts)?;
        let out = self.kernels.top_p(
            &probs.buffer,
            shape.tokens,
            shape.experts,
            &threshold.buffer,
            k_max,
        )?;
        Ok(self.selection(out, shape, k_max.unwrap_or(shape.experts), probs, "top_p"))
    }

    fn top_k(
        &self,
        probs: &GpuArray<K::Buffer>,
        shape: RouteShape,
        k: usize,
    ) -> Result<Selection<GpuArray<K::Buffer>, GpuArray<K::Buffer>>> {
        Self::check_len("top_k", "probs", probs, shape.len())?;
        crate::ops::check_k(k, shape.experts)?;
        let out = self
            .kernels
            .top_k(&probs.buffer, shape.tokens, shape.experts, k)?;
        Ok(self.selection(out, shape, k, probs, "top_k"))
    }

    fn drn_top_p(
        &self,
        logits: &GpuArray<K::Buffer>,
        shape: RouteShape,
        norm: Normalization,
        threshold: &GpuArray<K::Buffer>,
        k_max: Option<usize>,
    ) -> Result<Routed<GpuArray<K::Buffer>, GpuArray<K::Buffer>>> {
        Self::check_len("drn_top_p", "logits", logits, shape.len())?;
        if threshold.is_empty() {
            return Err(Error::shape("drn_top_p", "threshold buffer is empty"));
        }
        crate::ops::check_k_max(k_max, shape.experts)?;
        let theta = norm.theta()?;
        let keep = Keep::TopP {
            threshold: &threshold.buffer,
            k_max,
        };
        let out =
            self.kernels
                .drn_select(&logits.buffer, shape.tokens, shape.experts, theta, keep)?;
        let k_bound = k_max.unwrap_or(shape.experts);
        Ok(self.routed(out, logits, shape, k_bound, "top_p"))
    }

    fn drn_top_k(
        &self,
        logits: &GpuArray<K::Buffer>,
        shape: RouteShape,
        norm: Normalization,
        k: usize,
    ) -> Result<Routed<GpuArray<K::Buffer>, GpuArray<K::Buffer>>> {
        Self::check_len("drn_top_k", "logits", logits, shape.len())?;
        crate::ops::check_k(k, shape.experts)?;
        let theta = norm.theta()?;
        let out = self.kernels.drn_select(
            &logits.buffer,
            shape.tokens,
            shape.experts,
            theta,
            Keep::TopK(k),
        )?;
        Ok(self.routed(out, logits, shape, k, "top_k"))
    }

    fn dispatch_plan(
        &self,
        s: &Selection<GpuArray<K::Buffer>, GpuArray<K::Buffer>>,
    ) -> Result<DispatchPlan<GpuArray<K::Buffer>, GpuArray<K::Buffer>>> {
        let shape = s.shape;
        let capacity = shape.tokens * s.k_bound.clamp(1, shape.experts);
        let plan = self.kernels.dispatch_plan(
            &s.experts.buffer,
            &s.weights.buffer,
            &s.counts.buffer,
            shape.tokens,
            shape.experts,
            capacity,
        )?;
        let from = [&s.experts, &s.weights, &s.counts];
        let wrap = |b: K::Buffer, len| GpuArray::derived(b, len, &from, None);
        Ok(DispatchPlan {
            shape,
            route_capacity: capacity,
            expert_counts: wrap(plan.expert_counts, shape.experts),
            expert_offsets: wrap(plan.expert_offsets, shape.experts + 1),
            route_tokens: wrap(plan.route_tokens, capacity),
            route_weights: wrap(plan.route_weights, capacity),
            token_routes: wrap(plan.token_routes, shape.len()),
        })
    }

    fn gather(
        &self,
        x: &GpuArray<K::Buffer>,
        hidden: usize,
        plan: &DispatchPlan<GpuArray<K::Buffer>, GpuArray<K::Buffer>>,
    ) -> Result<GpuArray<K::Buffer>> {
        Self::check_len("gather", "x", x, plan.shape.tokens * hidden)?;
        let out = self.kernels.gather(
            &x.buffer,
            hidden,
            &buffers(plan),
            plan.route_capacity,
            plan.shape.experts,
        )?;
        Ok(GpuArray::derived(
            out,
            plan.route_capacity * hidden,
            &[x, &plan.route_tokens],
            None,
        ))
    }

    fn combine(
        &self,
        y: &GpuArray<K::Buffer>,
        hidden: usize,
        plan: &DispatchPlan<GpuArray<K::Buffer>, GpuArray<K::Buffer>>,
    ) -> Result<GpuArray<K::Buffer>> {
        Self::check_len("combine", "y", y, plan.route_capacity * hidden)?;
        let out = self.kernels.combine(
            &y.buffer,
            hidden,
            &buffers(plan),
            plan.shape.tokens,
            plan.shape.experts,
        )?;
        Ok(GpuArray::derived(
            out,
            plan.shape.tokens * hidden,
            &[y, &plan.token_routes],
            None,
        ))
    }

    fn controller_update(
        &self,
        state: &mut GpuArray<K::Buffer>,
        counts: &GpuArray<K::Buffer>,
        config: &ControllerConfig,
    ) -> Result<()> {
        config.validate()?;
        Self::check_len("controller_update", "state", state, DEVICE_STATE_LEN)?;
        if counts.is_empty() {
            return Err(Error::shape("controller_update", "no expert counts"));
        }
        self.kernels.controller_update(
            &state.buffer,
            &counts.buffer,
            counts.len,
            config.num_experts,
            config.target as f32,
            (config.kp as f32, config.ki as f32),
            (config.p_min as f32, config.p_max as f32),
        )?;
        // The counts' non-finite checks are not carried into the state: it lives for the
        // whole run and would collect two checks per step. A token with a non-finite
        // probability gets k = 1 from the selection kernel, so the state stays finite;
        // the error surfaces when the selection or anything after it is read.
        Ok(())
    }
}

impl<K: KernelSet> DeviceOps<K> {
    /// Probabilities computed from `logits`, with the kernel's check of the logits.
    fn probs(
        probs: K::Buffer,
        logit_status: K::Buffer,
        logits: &GpuArray<K::Buffer>,
        shape: RouteShape,
    ) -> GpuArray<K::Buffer> {
        let check = FiniteCheck {
            status: logit_status,
            source: logits.buffer.clone(),
            op: "drn_forward",
            what: "router logit",
            width: shape.experts,
        };
        GpuArray::derived(probs, shape.len(), &[logits], Some(check))
    }

    /// The arrays of a [`KernelSet::drn_select`]: every output carries the logits'
    /// check, the selection also the probabilities' (as the two ops would).
    fn routed(
        &self,
        out: RoutedBuffers<K::Buffer>,
        logits: &GpuArray<K::Buffer>,
        shape: RouteShape,
        k_bound: usize,
        op: &'static str,
    ) -> Routed<GpuArray<K::Buffer>, GpuArray<K::Buffer>> {
        let probs = Self::probs(out.probs, out.logit_status, logits, shape);
        let selection = self.selection(out.selection, shape, k_bound, &probs, op);
        Routed { probs, selection }
    }

    fn selection(
        &self,
        out: SelectionBuffers<K::Buffer>,
        shape: RouteShape,
        k_bound: usize,
        probs: &GpuArray<K::Buffer>,
        op: &'static str,
    ) -> Selection<GpuArray<K::Buffer>, GpuArray<K::Buffer>> {
        let check = FiniteCheck {
            status: out.status,
            source: probs.buffer.clone(),
            op,
            what: "probability",
            width: shape.experts,
        };
        let wrap = |b: K::Buffer, len| GpuArray::derived(b, len, &[probs], Some(check.clone()));
        Selection {
            shape,
            k_bound,
            experts: wrap(out.experts, shape.len()),
            weights: wrap(out.weights, shape.len()),
            counts: wrap(out.counts, shape.tokens),
        }
    }
}

fn buffers<B: Clone>(plan: &DispatchPlan<GpuArray<B>, GpuArray<B>>) -> PlanBuffers<B> {
    PlanBuffers {
        expert_counts: plan.expert_counts.buffer.clone(),
        expert_offsets: plan.expert_offsets.buffer.clone(),
        route_tokens: plan.route_tokens.buffer.clone(),
        route_weights: plan.route_weights.buffer.clone(),
        token_routes: plan.token_routes.buffer.clone(),
    }
}
