//! The routing ops on the WGSL kernels of `dtopp-shaders` (Vulkan, Metal, DX12, WebGPU).
//!
//! Buffers stay on the device between ops; nothing waits for the device until a result
//! is read. Non-finite inputs are recorded by the kernels in status buffers that travel
//! with every result computed from them, and are reported when such a result is read.

use dtopp_shaders::wgpu;
use dtopp_shaders::{DispatchBuffers, GpuContext, RoutingKernels, ShaderError};

use crate::controller::{ControllerConfig, DEVICE_STATE_LEN};
use crate::error::{Error, Result};
use crate::ops::{DispatchPlan, DrnGrads, Normalization, RouteShape, RoutingOps, Selection};

fn backend_error(e: ShaderError) -> Error {
    Error::Backend {
        backend: "wgpu",
        message: e.to_string(),
    }
}

/// A non-finite input check recorded by a kernel: `status[0]` is the first offending
/// row-major index of `source` (`u32::MAX` if none).
#[derive(Clone, Debug)]
struct FiniteCheck {
    status: wgpu::Buffer,
    source: wgpu::Buffer,
    op: &'static str,
    what: &'static str,
    width: usize,
}

/// A device buffer of `len` 4-byte values (f32 or i32, by use) and the non-finite checks
/// of everything it was computed from.
#[derive(Clone, Debug)]
pub struct DeviceArray {
    buffer: wgpu::Buffer,
    len: usize,
    checks: Vec<FiniteCheck>,
}

impl DeviceArray {
    /// The wgpu buffer (for chaining with other kernels, e.g. the trainer's).
    pub fn buffer(&self) -> &wgpu::Buffer {
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
        buffer: wgpu::Buffer,
        len: usize,
        from: &[&DeviceArray],
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

/// The WGSL backend: kernels compiled once for one device.
#[derive(Debug)]
pub struct WgpuOps {
    kernels: RoutingKernels,
}

impl WgpuOps {
    /// Requests an adapter and device (blocking; native) and compiles the kernels.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new() -> Result<Self> {
        Ok(Self::with_context(
            GpuContext::request_blocking().map_err(backend_error)?,
        ))
    }

    /// Requests an adapter and device and compiles the kernels (await it; in the browser
    /// this asks for WebGPU and fails, naming why, where the browser offers none).
    pub async fn request() -> Result<Self> {
        Ok(Self::with_context(
            GpuContext::request().await.map_err(backend_error)?,
        ))
    }

    /// Uses a device the caller already has (the trainer's, the app's, a test's).
    pub fn with_context(ctx: GpuContext) -> Self {
        Self {
            kernels: RoutingKernels::new(ctx),
        }
    }

    /// "name (backend, driver)" of the adapter, for logs.
    pub fn adapter_name(&self) -> String {
        self.kernels.context().adapter_name()
    }

    /// The kernels, for callers that chain their own work.
    pub fn kernels(&self) -> &RoutingKernels {
        &self.kernels
    }

    /// Blocking read-back (native). In the browser a read must be awaited
    /// (`RoutingKernels::read_async`), which the synchronous ops trait cannot do.
    fn read<T: bytemuck::Pod>(&self, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<T>> {
        #[cfg(not(target_arch = "wasm32"))]
        return self.kernels.read(buffer, len).map_err(backend_error);
        #[cfg(target_arch = "wasm32")]
        {
            let _ = (buffer, len);
            Err(Error::Backend {
                backend: "wgpu",
                message: "blocking read-back is not possible in the browser; await RoutingKernels::read_async".into(),
            })
        }
    }

    fn check(&self, array: &DeviceArray) -> Result<()> {
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

    /// Reads several integer arrays with one mapping (awaitable in the browser, where the
    /// synchronous trait reads cannot block), with the same non-finite checks as
    /// [`RoutingOps::read_ints`].
    pub async fn read_ints_async(&self, arrays: &[&DeviceArray]) -> Result<Vec<Vec<i32>>> {
        let checks: Vec<&FiniteCheck> = arrays.iter().flat_map(|a| &a.checks).collect();
        let requests: Vec<(&wgpu::Buffer, usize)> = checks
            .iter()
            .map(|c| (&c.status, 1))
            .chain(arrays.iter().map(|a| (&a.buffer, a.len)))
            .collect();
        let mut values: Vec<Vec<i32>> = self
            .kernels
            .read_many_async(&requests)
            .await
            .map_err(backend_error)?;
        let out = values.split_off(checks.len());
        for (c, status) in checks.iter().zip(&values) {
            let at = status[0] as u32;
            if at != u32::MAX {
                let at = at as usize;
                let source: Vec<f32> = self
                    .kernels
                    .read_async(&c.source, at + 1)
                    .await
                    .map_err(backend_error)?;
                return Err(Error::NonFinite {
                    op: c.op,
                    what: c.what,
                    token: at / c.width,
                    column: at % c.width,
                    value: source[at],
                });
            }
        }
        Ok(out)
    }

    fn array(&self, buffer: wgpu::Buffer, len: usize) -> DeviceArray {
        DeviceArray {
            buffer,
            len,
            checks: Vec::new(),
        }
    }

    fn check_len(op: &'static str, name: &str, a: &DeviceArray, expected: usize) -> Result<()> {
        crate::ops::check_len(op, name, a.len, expected)
    }
}

impl RoutingOps for WgpuOps {
    type Floats = DeviceArray;
    type Ints = DeviceArray;

    fn backend_name(&self) -> &'static str {
        "wgpu"
    }

    fn upload_floats(&self, data: &[f32]) -> Result<DeviceArray> {
        let buffer = self.kernels.upload("upload", data).map_err(backend_error)?;
        Ok(self.array(buffer, data.len()))
    }

    fn upload_ints(&self, data: &[i32]) -> Result<DeviceArray> {
        let buffer = self.kernels.upload("upload", data).map_err(backend_error)?;
        Ok(self.array(buffer, data.len()))
    }

    fn synchronize(&self) -> Result<()> {
        #[cfg(not(target_arch = "wasm32"))]
        self.kernels.synchronize().map_err(backend_error)?;
        Ok(())
    }

    fn read_floats(&self, a: &DeviceArray) -> Result<Vec<f32>> {
        self.check(a)?;
        self.read(&a.buffer, a.len)
    }

    fn read_ints(&self, a: &DeviceArray) -> Result<Vec<i32>> {
        self.check(a)?;
        self.read(&a.buffer, a.len)
    }

    fn drn_forward(
        &self,
        logits: &DeviceArray,
        shape: RouteShape,
        norm: Normalization,
    ) -> Result<DeviceArray> {
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
        Ok(DeviceArray::derived(
            probs,
            shape.len(),
            &[logits],
            Some(check),
        ))
    }

    fn drn_backward(
        &self,
        logits: &DeviceArray,
        probs: &DeviceArray,
        grad_probs: &DeviceArray,
        shape: RouteShape,
        norm: Normalization,
    ) -> Result<DrnGrads<DeviceArray>> {
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
            logits: DeviceArray::derived(dz, shape.len(), &from, Some(check.clone())),
            theta: DeviceArray::derived(dtheta, 1, &from, Some(check)),
        })
    }

    fn top_p(
        &self,
        probs: &DeviceArray,
        shape: RouteShape,
        threshold: &DeviceArray,
        k_max: Option<usize>,
    ) -> Result<Selection<DeviceArray, DeviceArray>> {
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
        probs: &DeviceArray,
        shape: RouteShape,
        k: usize,
    ) -> Result<Selection<DeviceArray, DeviceArray>> {
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
        s: &Selection<DeviceArray, DeviceArray>,
    ) -> Result<DispatchPlan<DeviceArray, DeviceArray>> {
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
        let wrap = |b: wgpu::Buffer, len| DeviceArray::derived(b, len, &from, None);
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
        x: &DeviceArray,
        hidden: usize,
        plan: &DispatchPlan<DeviceArray, DeviceArray>,
    ) -> Result<DeviceArray> {
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
        Ok(DeviceArray::derived(
            out,
            plan.route_capacity * hidden,
            &[x, &plan.route_tokens],
            None,
        ))
    }

    fn combine(
        &self,
        y: &DeviceArray,
        hidden: usize,
        plan: &DispatchPlan<DeviceArray, DeviceArray>,
    ) -> Result<DeviceArray> {
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
        Ok(DeviceArray::derived(
            out,
            plan.shape.tokens * hidden,
            &[y, &plan.token_routes],
            None,
        ))
    }

    fn controller_update(
        &self,
        state: &mut DeviceArray,
        counts: &DeviceArray,
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

impl WgpuOps {
    fn selection(
        &self,
        out: dtopp_shaders::SelectionBuffers,
        shape: RouteShape,
        k_bound: usize,
        probs: &DeviceArray,
        op: &'static str,
    ) -> Selection<DeviceArray, DeviceArray> {
        let check = FiniteCheck {
            status: out.status,
            source: probs.buffer.clone(),
            op,
            what: "probability",
            width: shape.experts,
        };
        let wrap =
            |b: wgpu::Buffer, len| DeviceArray::derived(b, len, &[probs], Some(check.clone()));
        Selection {
            shape,
            k_bound,
            experts: wrap(out.experts, shape.len()),
            weights: wrap(out.weights, shape.len()),
            counts: wrap(out.counts, shape.tokens),
        }
    }
}

fn buffers(plan: &DispatchPlan<DeviceArray, DeviceArray>) -> DispatchBuffers {
    DispatchBuffers {
        expert_counts: plan.expert_counts.buffer.clone(),
        expert_offsets: plan.expert_offsets.buffer.clone(),
        route_tokens: plan.route_tokens.buffer.clone(),
        route_weights: plan.route_weights.buffer.clone(),
        token_routes: plan.token_routes.buffer.clone(),
    }
}
