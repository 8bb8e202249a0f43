//! The routing ops on the CUDA kernels of `dtopp-cuda` (NVRTC at run time; a stand-in
//! whose constructor says so in builds without the `cuda` feature).
//!
//! Buffers stay on the device between ops; nothing waits for the device until a result
//! is read. Non-finite inputs are recorded by the kernels in status buffers that travel
//! with every result computed from them, and are reported when such a result is read.

use dtopp_cuda::{CudaError, CudaKernels, DeviceBuffer, DispatchBuffers};

use crate::controller::{ControllerConfig, DEVICE_STATE_LEN};
use crate::error::{Error, Result};
use crate::ops::{DispatchPlan, DrnGrads, Normalization, RouteShape, RoutingOps, Selection};

fn backend_error(e: CudaError) -> Error {
    Error::Backend {
        backend: "cuda",
        message: e.to_string(),
    }
}

/// A non-finite input check recorded by a kernel: `status[0]` is the first offending
/// row-major index of `source` (`u32::MAX` if none).
#[derive(Clone, Debug)]
struct FiniteCheck {
    status: DeviceBuffer,
    source: DeviceBuffer,
    op: &'static str,
    what: &'static str,
    width: usize,
}

/// A device buffer of `len` 4-byte values (f32 or i32, by use) and the non-finite checks
/// of everything it was computed from.
#[derive(Clone, Debug)]
pub struct CudaArray {
    buffer: DeviceBuffer,
    len: usize,
    checks: Vec<FiniteCheck>,
}

impl CudaArray {
    /// The device buffer (for chaining with other kernels, e.g. the trainer's).
    pub fn buffer(&self) -> &DeviceBuffer {
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
        buffer: DeviceBuffer,
        len: usize,
        from: &[&CudaArray],
        check: Option<FiniteCheck>,
    ) -> Self {
        let mut checks: Vec<FiniteCheck> =
            from.iter().flat_map(|a| a.checks.iter().cloned()).collect();
        checks.extend(check);
        Self {
            buffer,
            len,
            checks,
        }
    }
}

/// The CUDA backend: kernels loaded once on one device.
#[derive(Debug)]
pub struct CudaOps {
    kernels: CudaKernels,
}

impl CudaOps {
    /// Opens CUDA device `ordinal` and loads the kernels (compiled by NVRTC once per
    /// process). Fails, naming what is missing, without the `cuda` feature, without a
    /// driver, without NVRTC or without the device; never falls back to another backend.
    pub fn new(ordinal: usize) -> Result<Self> {
        Ok(Self {
            kernels: CudaKernels::new(ordinal).map_err(backend_error)?,
        })
    }

    /// "name (device N)" of the GPU, for logs.
    pub fn device_name(&self) -> String {
        self.kernels.device_name()
    }

    /// The kernels, for callers that chain their own work.
    pub fn kernels(&self) -> &CudaKernels {
        &self.kernels
    }

    fn read<T: bytemuck::Pod>(&self, buffer: &DeviceBuffer, len: usize) -> Result<Vec<T>> {
        self.kernels.read(buffer, len).map_err(backend_error)
    }

    fn check(&self, array: &CudaArray) -> Result<()> {
        for c in &array.checks {
            let status: Vec<u32> = self.read(&c.status, 1)?;
            if status[0] != u32::MAX {
                let at = status[0] as usize;
                let values: Vec<f32> = self.read(&c.source, at + 1)?;
                return Err(Error::NonFinite {
                    op: c.op,
                    what: c.what,
                    token: at / c.width,
                    column: at % c.width,
                    value: values[at],
                });
            }
        }
        Ok(())
    }

    fn array(&self, buffer: DeviceBuffer, len: usize) -> CudaArray {
        CudaArray {
            buffer,
            len,
            checks: Vec::new(),
        }
    }

    fn check_len(op: &'static str, name: &str, a: &CudaArray, expected: usize) -> Result<()> {
        crate::ops::check_len(op, name, a.len, expected)
    }
}

impl RoutingOps for CudaOps {
    type Floats = CudaArray;
    type Ints = CudaArray;

    fn backend_name(&self) -> &'static str {
        "cuda"
    }

    fn upload_floats(&self, data: &[f32]) -> Result<CudaArray> {
        let buffer = self.kernels.upload("upload", data).map_err(backend_error)?;
        Ok(self.array(buffer, data.len()))
    }

    fn upload_ints(&self, data: &[i32]) -> Result<CudaArray> {
        let buffer = self.kernels.upload("upload", data).map_err(backend_error)?;
        Ok(self.array(buffer, data.len()))
    }

    fn synchronize(&self) -> Result<()> {
        self.kernels.synchronize().map_err(backend_error)
    }

    fn read_floats(&self, a: &CudaArray) -> Result<Vec<f32>> {
        self.check(a)?;
        self.read(&a.buffer, a.len)
    }

    fn read_ints(&self, a: &CudaArray) -> Result<Vec<i32>> {
        self.check(a)?;
        self.read(&a.buffer, a.len)
    }

    fn drn_forward(
        &self,
        logits: &CudaArray,
        shape: RouteShape,
        norm: Normalization,
    ) -> Result<CudaArray> {
        Self::check_len("drn_forward", "logits", logits, shape.len())?;
        let theta = norm.theta()?;
        let (probs, status) = self
            .kernels
            .drn_forward(&logits.buffer, shape.tokens, shape.experts, theta)
            .map_err(backend_error)?;
        let check = FiniteCheck {
            status,
            source: logits.buffer.clone(),
            op: "drn_forward",
            what: "router logit",
            width: shape.experts,
        };
        Ok(CudaArray::derived(
            probs,
            shape.len(),
            &[logits],
            Some(check),
        ))
    }

    fn drn_backward(
        &self,
        logits: &CudaArray,
        probs: &CudaArray,
        grad_probs: &CudaArray,
        shape: RouteShape,
        norm: Normalization,
    ) -> Result<DrnGrads<CudaArray>> {
        const OP: &str = "drn_backward";
        Self::check_len(OP, "logits", logits, shape.len())?;
        Self::check_len(OP, "probs", probs, shape.len())?;
        Self::check_len(OP, "grad_probs", grad_probs, shape.len())?;
        let theta = norm.theta()?;
        let (dz, dtheta, status) = self
            .kernels
            .drn_backward(
                &logits.buffer,
                &probs.buffer,
                &grad_probs.buffer,
                shape.tokens,
                shape.experts,
                theta,
            )
            .map_err(backend_error)?;
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
            logits: CudaArray::derived(dz, shape.len(), &from, Some(check.clone())),
            theta: CudaArray::derived(dtheta, 1, &from, Some(check)),
        })
    }

    fn top_p(
        &self,
        probs: &CudaArray,
        shape: RouteShape,
        threshold: &CudaArray,
        k_max: Option<usize>,
    ) -> Result<Selection<CudaArray, CudaArray>> {
        Self::check_len("top_p", "probs", probs, shape.len())?;
        if threshold.is_empty() {
            return Err(Error::shape("top_p", "threshold buffer is empty"));
        }
        crate::cpu::check_k_max(k_max, shape.experts)?;
        let out = self
            .kernels
            .top_p(
                &probs.buffer,
                shape.tokens,
                shape.experts,
                &threshold.buffer,
                k_max,
            )
            .map_err(backend_error)?;
        Ok(self.selection(out, shape, k_max.unwrap_or(shape.experts), probs, "top_p"))
    }

    fn top_k(
        &self,
        probs: &CudaArray,
        shape: RouteShape,
        k: usize,
    ) -> Result<Selection<CudaArray, CudaArray>> {
        Self::check_len("top_k", "probs", probs, shape.len())?;
        crate::cpu::check_k(k, shape.experts)?;
        let out = self
            .kernels
            .top_k(&probs.buffer, shape.tokens, shape.experts, k)
            .map_err(backend_error)?;
        Ok(self.selection(out, shape, k, probs, "top_k"))
    }

    fn dispatch_plan(
        &self,
        s: &Selection<CudaArray, CudaArray>,
    ) -> Result<DispatchPlan<CudaArray, CudaArray>> {
        let shape = s.shape;
        let capacity = shape.tokens * s.k_bound.clamp(1, shape.experts);
        let plan = self
            .kernels
            .dispatch_plan(
                &s.experts.buffer,
                &s.weights.buffer,
                &s.counts.buffer,
                shape.tokens,
                shape.experts,
                capacity,
            )
            .map_err(backend_error)?;
        let from = [&s.experts, &s.weights, &s.counts];
        let wrap = |b: DeviceBuffer, len| CudaArray::derived(b, len, &from, None);
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
        x: &CudaArray,
        hidden: usize,
        plan: &DispatchPlan<CudaArray, CudaArray>,
    ) -> Result<CudaArray> {
        Self::check_len("gather", "x", x, plan.shape.tokens * hidden)?;
        let out = self
            .kernels
            .gather(
                &x.buffer,
                hidden,
                &buffers(plan),
                plan.route_capacity,
                plan.shape.experts,
            )
            .map_err(backend_error)?;
        Ok(CudaArray::derived(
            out,
            plan.route_capacity * hidden,
            &[x, &plan.route_tokens],
            None,
        ))
    }

    fn combine(
        &self,
        y: &CudaArray,
        hidden: usize,
        plan: &DispatchPlan<CudaArray, CudaArray>,
    ) -> Result<CudaArray> {
        Self::check_len("combine", "y", y, plan.route_capacity * hidden)?;
        let out = self
            .kernels
            .combine(
                &y.buffer,
                hidden,
                &buffers(plan),
                plan.shape.tokens,
                plan.shape.experts,
            )
            .map_err(backend_error)?;
        Ok(CudaArray::derived(
            out,
            plan.shape.tokens * hidden,
            &[y, &plan.token_routes],
            None,
        ))
    }

    fn controller_update(
        &self,
        state: &mut CudaArray,
        counts: &CudaArray,
        config: &ControllerConfig,
    ) -> Result<()> {
        config.validate()?;
        Self::check_len("controller_update", "state", state, DEVICE_STATE_LEN)?;
        if counts.is_empty() {
            return Err(Error::shape("controller_update", "no expert counts"));
        }
        self.kernels
            .controller_update(
                &state.buffer,
                &counts.buffer,
                counts.len,
                config.num_experts,
                config.target as f32,
                (config.kp as f32, config.ki as f32),
                (config.p_min as f32, config.p_max as f32),
            )
            .map_err(backend_error)?;
        // The counts' non-finite checks are not carried into the state: it lives for the
        // whole run and would collect two checks per step. A token with a non-finite
        // probability gets k = 1 from the selection kernel, so the state stays finite;
        // the error surfaces when the selection or anything after it is read.
        Ok(())
    }
}

impl CudaOps {
    fn selection(
        &self,
        out: dtopp_cuda::SelectionBuffers,
        shape: RouteShape,
        k_bound: usize,
        probs: &CudaArray,
        op: &'static str,
    ) -> Selection<CudaArray, CudaArray> {
        let check = FiniteCheck {
            status: out.status,
            source: probs.buffer.clone(),
            op,
            what: "probability",
            width: shape.experts,
        };
        let wrap = |b: DeviceBuffer, len| CudaArray::derived(b, len, &[probs], Some(check.clone()));
        Selection {
            shape,
            k_bound,
            experts: wrap(out.experts, shape.len()),
            weights: wrap(out.weights, shape.len()),
            counts: wrap(out.counts, shape.tokens),
        }
    }
}

fn buffers(plan: &DispatchPlan<CudaArray, CudaArray>) -> DispatchBuffers {
    DispatchBuffers {
        expert_counts: plan.expert_counts.buffer.clone(),
        expert_offsets: plan.expert_offsets.buffer.clone(),
        route_tokens: plan.route_tokens.buffer.clone(),
        route_weights: plan.route_weights.buffer.clone(),
        token_routes: plan.token_routes.buffer.clone(),
    }
}
