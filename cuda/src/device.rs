//! The kernels on a CUDA device through cudarc: the driver and NVRTC are loaded at run
//! time (no toolkit at build time), the `.cu` sources compiled once per process to PTX
//! (targeting compute_80, JIT-compiled by the driver for Ampere, Hopper and newer) and
//! loaded once per device. Every launch is asynchronous on one stream; nothing waits for
//! the device until a buffer is read.
//
// Launches are `unsafe` in cudarc (the argument list must match the kernel's
// signature); each launch below passes exactly the kernel's parameters, in order, with
// the C types they are declared with (pointers, `unsigned`, `int`, `float`).
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};

use crate::GemmPrecision;
use crate::error::CudaError;
use crate::params::{ControllerParams, DRN_EPS, DrnDims, GroupedDims, PlanDims, SelectDims};
use crate::source::MODULES;

/// Warps per block of the warp-per-token kernels (`WARPS` in drn.cu / select.cu).
const WARPS: u32 = 8;
/// Threads per block of the other kernels.
const BLOCK: u32 = 256;
/// `status` value meaning "no non-finite input seen".
const STATUS_CLEAN: u32 = u32::MAX;
/// Largest `E` the fused DRN + selection kernels serve (8 values per lane in registers).
pub const FUSED_MAX_EXPERTS: usize = 256;
/// Rows and columns of a grouped product's block tile (`TILE` in grouped_matmul.cu).
const GEMM_TILE: usize = 64;
/// Largest element count the kernels index with 32-bit integers.
const MAX_ELEMENTS: u64 = u32::MAX as u64;

// SAFETY: `#[repr(C)]` structs of 4-byte fields, declared field for field as the kernels
// `GroupedDims`, `SelectDims`, `PlanDims`, `DrnDims` and `ControllerParams`; cudarc passes
// them by value.
unsafe impl DeviceRepr for GroupedDims {}
unsafe impl DeviceRepr for SelectDims {}
unsafe impl DeviceRepr for PlanDims {}
unsafe impl DeviceRepr for DrnDims {}
unsafe impl DeviceRepr for ControllerParams {}

/// A device buffer of 4-byte values (f32, i32 or u32 by use), cheap to clone.
#[derive(Clone, Debug)]
pub struct DeviceBuffer {
    slice: Arc<CudaSlice<u32>>,
    len: usize,
}

impl DeviceBuffer {
    /// Values held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The buffers of a selection.
#[derive(Clone, Debug)]
pub struct SelectionBuffers {
    /// `[N, E]` i32.
    pub experts: DeviceBuffer,
    /// `[N, E]` f32.
    pub weights: DeviceBuffer,
    /// `[N]` i32.
    pub counts: DeviceBuffer,
    /// `[1]` u32: index of the first non-finite probability, or `u32::MAX`.
    pub status: DeviceBuffer,
}

/// The buffers of a fused DRN + selection ([`CudaKernels::drn_select`]).
#[derive(Clone, Debug)]
pub struct RoutedBuffers {
    /// `[N, E]` f32 probabilities.
    pub probs: DeviceBuffer,
    /// `[1]` u32: index of the first non-finite logit, or `u32::MAX`.
    pub logit_status: DeviceBuffer,
    /// The selection; its status names the first non-finite probability.
    pub selection: SelectionBuffers,
}

/// The buffers of a dispatch plan (see `dtopp::ops::DispatchPlan`).
#[derive(Clone, Debug)]
pub struct DispatchBuffers {
    /// `[E]` i32.
    pub expert_counts: DeviceBuffer,
    /// `[E + 1]` i32.
    pub expert_offsets: DeviceBuffer,
    /// `[capacity]` i32.
    pub route_tokens: DeviceBuffer,
    /// `[capacity]` f32.
    pub route_weights: DeviceBuffer,
    /// `[N, E]` i32.
    pub token_routes: DeviceBuffer,
}

/// Whether the driver library (libcuda) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library; no symbol is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether NVRTC (libnvrtc) can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library; no symbol is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Each module's file and PTX, or the file NVRTC rejected and its log.
type CompiledModules = Result<Vec<(&'static str, Ptx)>, (&'static str, String)>;

/// PTX of every module, compiled by NVRTC once per process. Needs NVRTC, not a GPU.
pub fn compiled_modules() -> Result<&'static [(&'static str, Ptx)], CudaError> {
    static CACHE: OnceLock<CompiledModules> = OnceLock::new();
    if !nvrtc_present() {
        return Err(CudaError::MissingLibrary {
            library: "NVRTC (libnvrtc)",
            hint: "install the CUDA runtime compiler (e.g. the nvidia-cuda-nvrtc wheel or a CUDA toolkit) and put its lib directory on LD_LIBRARY_PATH",
        });
    }
    let cached = CACHE.get_or_init(|| {
        MODULES
            .iter()
            .map(|&(file, src, _)| {
                let opts = CompileOptions {
                    arch: Some("compute_80"),
                    options: vec!["--std=c++17".into()],
                    name: Some(file.into()),
                    ..Default::default()
                };
                compile_ptx_with_opts(crate::source::expanded(src), opts)
                    .map(|ptx| (file, ptx))
                    .map_err(|e| (file, e.to_string()))
            })
            .collect()
    });
    match cached {
        Ok(modules) => Ok(modules),
        Err((file, log)) => Err(CudaError::Compile {
            file,
            log: log.clone(),
        }),
    }
}

/// An error naming the driver unless libcuda can be loaded.
fn require_driver() -> Result<(), CudaError> {
    if driver_present() {
        return Ok(());
    }
    Err(CudaError::MissingLibrary {
        library: "the NVIDIA driver (libcuda)",
        hint: "this machine has no NVIDIA driver; use --backend wgpu or cpu",
    })
}

/// Device `ordinal`'s context (the driver's primary one, which burn-cuda shares).
fn context(ordinal: usize) -> Result<Arc<CudaContext>, CudaError> {
    CudaContext::new(ordinal).map_err(|e| CudaError::NoDevice {
        ordinal,
        message: e.to_string(),
    })
}

/// [`context`], after [`require_driver`].
fn open(ordinal: usize) -> Result<Arc<CudaContext>, CudaError> {
    require_driver()?;
    context(ordinal)
}

/// Free and total bytes of device `ordinal`'s memory, as the driver reports them (for
/// refusing a training run that cannot fit before anything is allocated).
pub fn device_memory(ordinal: usize) -> Result<(u64, u64), CudaError> {
    let ctx = open(ordinal)?;
    let (free, total) = ctx.mem_get_info().map_err(driver("memory info"))?;
    Ok((free as u64, total as u64))
}

/// Device `ordinal`'s compute capability (major, minor), as the driver reports it.
pub fn compute_capability(ordinal: usize) -> Result<(u32, u32), CudaError> {
    let ctx = open(ordinal)?;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(driver("compute capability"))?;
    Ok((major.max(0) as u32, minor.max(0) as u32))
}

fn driver(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CudaError {
    move |e| CudaError::Driver {
        what,
        message: e.to_string(),
    }
}

/// Every routing kernel, loaded on one device.
#[derive(Debug)]
pub struct CudaKernels {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    name: String,
}

impl CudaKernels {
    /// Opens device `ordinal` and loads the kernels (compiled once per process). Without
    /// a driver, NVRTC or the device, an error says which is missing.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        require_driver()?;
        let modules = compiled_modules()?;
        let count = CudaContext::device_count().map_err(driver("device count"))?;
        if ordinal >= usize::try_from(count).unwrap_or(0) {
            return Err(CudaError::NoDevice {
                ordinal,
                message: format!("the driver reports {count} device(s)"),
            });
        }
        let ctx = context(ordinal)?;
        let name = ctx.name().map_err(driver("device name"))?;
        let stream = ctx.default_stream();
        let mut functions = HashMap::new();
        for ((_, ptx), (_, _, kernels)) in modules.iter().zip(MODULES.iter()) {
            let module = ctx
                .load_module(ptx.clone())
                .map_err(driver("load module"))?;
            for &k in kernels.iter() {
                functions.insert(k, module.load_function(k).map_err(driver("load kernel"))?);
            }
        }
        Ok(Self {
            ctx,
            stream,
            functions,
            name,
        })
    }

    /// "name (device N)".
    pub fn device_name(&self) -> String {
        format!("{} (device {})", self.name, self.ctx.ordinal())
    }

    /// Bytes of device memory in use (by every process and memory pool on the device:
    /// total minus free, as the driver reports them).
    pub fn memory_in_use(&self) -> Result<u64, CudaError> {
        let (free, total) = self.ctx.mem_get_info().map_err(driver("memory info"))?;
        Ok((total - free) as u64)
    }

    fn function(&self, name: &str) -> &CudaFunction {
        &self.functions[name]
    }

    fn check_size(what: &str, elements: usize) -> Result<(), CudaError> {
        if elements as u64 > MAX_ELEMENTS {
            return Err(CudaError::TooLarge {
                what: what.to_string(),
                elements: elements as u64,
                limit: MAX_ELEMENTS,
            });
        }
        Ok(())
    }

    /// A buffer holding `data` (f32, i32 or u32).
    pub fn upload<T: bytemuck::Pod>(
        &self,
        what: &str,
        data: &[T],
    ) -> Result<DeviceBuffer, CudaError> {
        assert_eq!(size_of::<T>(), 4, "4-byte values only");
        Self::check_size(what, data.len())?;
        let words: &[u32] = bytemuck::cast_slice(data);
        // An empty buffer still gets one word, so a kernel can be passed a valid pointer.
        let slice = if words.is_empty() {
            self.stream.alloc_zeros::<u32>(1)
        } else {
            self.stream.clone_htod(words)
        }
        .map_err(driver("upload"))?;
        Ok(DeviceBuffer {
            slice: Arc::new(slice),
            len: data.len(),
        })
    }

    /// A zeroed buffer of `len` values.
    pub fn zeros(&self, what: &str, len: usize) -> Result<DeviceBuffer, CudaError> {
        Self::check_size(what, len)?;
        let slice = self
            .stream
            .alloc_zeros::<u32>(len.max(1))
            .map_err(driver("allocate"))?;
        Ok(DeviceBuffer {
            slice: Arc::new(slice),
            len,
        })
    }

    /// Copies the first `len` values back (waits for the stream).
    pub fn read<T: bytemuck::Pod>(
        &self,
        buffer: &DeviceBuffer,
        len: usize,
    ) -> Result<Vec<T>, CudaError> {
        assert_eq!(size_of::<T>(), 4, "4-byte values only");
        let words = self
            .stream
            .clone_dtoh(&*buffer.slice)
            .map_err(driver("read back"))?;
        Ok(bytemuck::cast_slice(&words[..len.min(buffer.len)]).to_vec())
    }

    /// Waits until every launched kernel has finished.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(driver("synchronize"))
    }

    fn status(&self) -> Result<DeviceBuffer, CudaError> {
        self.upload("status", &[STATUS_CLEAN])
    }

    fn warp_grid(tokens: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((tokens as u32).div_ceil(WARPS).max(1), 1, 1),
            block_dim: (WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn thread_grid(threads: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                (threads as u64).div_ceil(u64::from(BLOCK)).max(1) as u32,
                1,
                1,
            ),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn one_block() -> LaunchConfig {
        LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// DRN (`theta: Some`) or plain softmax (`None`) of `[N, E]` logits: the
    /// probabilities and a status buffer (first non-finite logit, or `u32::MAX`).
    pub fn drn_forward(
        &self,
        logits: &DeviceBuffer,
        tokens: usize,
        experts: usize,
        theta: Option<f32>,
    ) -> Result<(DeviceBuffer, DeviceBuffer), CudaError> {
        let probs = self.zeros("probs", tokens * experts)?;
        let status = self.status()?;
        let theta_buf = self.upload("theta", &[theta.unwrap_or(1.0)])?;
        let dims = DrnDims::new(tokens, experts, theta.is_some(), DRN_EPS);
        let mut b = self.stream.launch_builder(self.function("drn_forward"));
        b.arg(&*logits.slice)
            .arg(&*theta_buf.slice)
            .arg(&*probs.slice)
            .arg(&*status.slice)
            .arg(&dims);
        // SAFETY: drn_forward(const float* x2, float*, unsigned*, DrnDims).
        unsafe { b.launch(Self::warp_grid(tokens)) }.map_err(driver("drn_forward"))?;
        Ok((probs, status))
    }

    /// Backward of [`CudaKernels::drn_forward`]: dL/dz `[N, E]`, dL/dtheta `[1]`, and a
    /// status buffer (first non-finite logit or gradient).
    pub fn drn_backward(
        &self,
        logits: &DeviceBuffer,
        probs: &DeviceBuffer,
        grad_probs: &DeviceBuffer,
        tokens: usize,
        experts: usize,
        theta: Option<f32>,
    ) -> Result<(DeviceBuffer, DeviceBuffer, DeviceBuffer), CudaError> {
        let grad_logits = self.zeros("grad logits", tokens * experts)?;
        let partials = self.zeros("theta partials", tokens)?;
        let grad_theta = self.zeros("grad theta", 1)?;
        let status = self.status()?;
        let theta_buf = self.upload("theta", &[theta.unwrap_or(1.0)])?;
        let dims = DrnDims::new(tokens, experts, theta.is_some(), DRN_EPS);
        let mut b = self.stream.launch_builder(self.function("drn_backward"));
        b.arg(&*logits.slice)
            .arg(&*theta_buf.slice)
            .arg(&*probs.slice)
            .arg(&*grad_probs.slice)
            .arg(&*grad_logits.slice)
            .arg(&*partials.slice)
            .arg(&*status.slice)
            .arg(&dims);
        // SAFETY: drn_backward(const float* x4, float* x2, unsigned*, DrnDims).
        unsafe { b.launch(Self::warp_grid(tokens)) }.map_err(driver("drn_backward"))?;
        let mut b = self.stream.launch_builder(self.function("drn_theta_sum"));
        b.arg(&*partials.slice).arg(&*grad_theta.slice).arg(&dims);
        // SAFETY: drn_theta_sum(const float*, float*, DrnDims), one block of 256 threads.
        unsafe { b.launch(Self::one_block()) }.map_err(driver("drn_theta_sum"))?;
        Ok((grad_logits, grad_theta, status))
    }

    fn selection_buffers(
        &self,
        tokens: usize,
        experts: usize,
    ) -> Result<SelectionBuffers, CudaError> {
        Ok(SelectionBuffers {
            experts: self.zeros("selected experts", tokens * experts)?,
            weights: self.zeros("combine weights", tokens * experts)?,
            counts: self.zeros("expert counts", tokens)?,
            status: self.status()?,
        })
    }

    /// Top-p selection of `[N, E]` probabilities with `p = threshold[0]`.
    pub fn top_p(
        &self,
        probs: &DeviceBuffer,
        tokens: usize,
        experts: usize,
        threshold: &DeviceBuffer,
        k_max: Option<usize>,
    ) -> Result<SelectionBuffers, CudaError> {
        let out = self.selection_buffers(tokens, experts)?;
        let dims = SelectDims::new(tokens, experts, k_max.unwrap_or(0));
        let mut b = self.stream.launch_builder(self.function("top_p"));
        b.arg(&*probs.slice)
            .arg(&*threshold.slice)
            .arg(&*out.experts.slice)
            .arg(&*out.weights.slice)
            .arg(&*out.counts.slice)
            .arg(&*out.status.slice)
            .arg(&dims);
        // SAFETY: top_p(const float*, const float*, int*, float*, int*, unsigned*,
        // SelectDims).
        unsafe { b.launch(Self::warp_grid(tokens)) }.map_err(driver("top_p"))?;
        Ok(out)
    }

    /// DRN (`theta: Some`) or softmax, then selection, in one kernel (`route.cu`):
    /// Top-p at `p = threshold[0]` capped at `limit` experts when `threshold` is given,
    /// else the top `limit`. `experts` must be at most [`FUSED_MAX_EXPERTS`].
    pub fn drn_select(
        &self,
        logits: &DeviceBuffer,
        tokens: usize,
        experts: usize,
        theta: Option<f32>,
        threshold: Option<&DeviceBuffer>,
        limit: usize,
    ) -> Result<RoutedBuffers, CudaError> {
        let kernel = match experts {
            0..=32 => "drn_select_r1",
            33..=64 => "drn_select_r2",
            65..=128 => "drn_select_r4",
            129..=FUSED_MAX_EXPERTS => "drn_select_r8",
            _ => {
                return Err(CudaError::TooLarge {
                    what: "experts per token of the fused routing kernel".into(),
                    elements: experts as u64,
                    limit: FUSED_MAX_EXPERTS as u64,
                });
            }
        };
        let out = RoutedBuffers {
            probs: self.zeros("probs", tokens * experts)?,
            logit_status: self.status()?,
            selection: self.selection_buffers(tokens, experts)?,
        };
        let (n, e, limit) = (tokens as u32, experts as u32, limit as u32);
        let (theta_v, use_drn, eps) = (theta.unwrap_or(1.0), i32::from(theta.is_some()), DRN_EPS);
        let use_p = i32::from(threshold.is_some());
        // Top-k never reads the threshold; any valid device pointer fills the slot.
        let threshold = threshold.unwrap_or(logits);
        let sel = &out.selection;
        let mut b = self.stream.launch_builder(self.function(kernel));
        b.arg(&*logits.slice)
            .arg(&*threshold.slice)
            .arg(&*out.probs.slice)
            .arg(&*sel.experts.slice)
            .arg(&*sel.weights.slice)
            .arg(&*sel.counts.slice)
            .arg(&*out.logit_status.slice)
            .arg(&*sel.status.slice)
            .arg(&n)
            .arg(&e)
            .arg(&theta_v)
            .arg(&use_drn)
            .arg(&eps)
            .arg(&limit)
            .arg(&use_p);
        // SAFETY: drn_select_rR(const float* x2, float*, int*, float*, int*, unsigned* x2,
        // unsigned, unsigned, float, int, float, unsigned, int).
        unsafe { b.launch(Self::warp_grid(tokens)) }.map_err(driver(kernel))?;
        Ok(out)
    }

    /// Top-k selection of `[N, E]` probabilities.
    pub fn top_k(
        &self,
        probs: &DeviceBuffer,
        tokens: usize,
        experts: usize,
        k: usize,
    ) -> Result<SelectionBuffers, CudaError> {
        let out = self.selection_buffers(tokens, experts)?;
        let dims = SelectDims::new(tokens, experts, k);
        let mut b = self.stream.launch_builder(self.function("top_k"));
        b.arg(&*probs.slice)
            .arg(&*out.experts.slice)
            .arg(&*out.weights.slice)
            .arg(&*out.counts.slice)
            .arg(&*out.status.slice)
            .arg(&dims);
        // SAFETY: top_k(const float*, int*, float*, int*, unsigned*, SelectDims).
        unsafe { b.launch(Self::warp_grid(tokens)) }.map_err(driver("top_k"))?;
        Ok(out)
    }

    /// The expert-major dispatch plan of a selection, route arrays of `capacity`.
    pub fn dispatch_plan(
        &self,
        experts_sel: &DeviceBuffer,
        weights_sel: &DeviceBuffer,
        counts_sel: &DeviceBuffer,
        tokens: usize,
        experts: usize,
        capacity: usize,
    ) -> Result<DispatchBuffers, CudaError> {
        let dims = PlanDims::new(tokens, experts);
        let chunks = dims.num_chunks as usize;
        let table = self.zeros("chunk offsets", chunks * experts)?;
        let plan = DispatchBuffers {
            expert_counts: self.zeros("expert counts", experts)?,
            expert_offsets: self.zeros("expert offsets", experts + 1)?,
            route_tokens: self.zeros("route tokens", capacity)?,
            route_weights: self.zeros("route weights", capacity)?,
            token_routes: self.zeros("token routes", tokens * experts)?,
        };
        let mut b = self.stream.launch_builder(self.function("plan_count"));
        b.arg(&*experts_sel.slice)
            .arg(&*counts_sel.slice)
            .arg(&*table.slice)
            .arg(&dims);
        // SAFETY: plan_count(const int*, const int*, unsigned*, PlanDims).
        unsafe { b.launch(Self::thread_grid(chunks)) }.map_err(driver("plan_count"))?;
        let mut b = self.stream.launch_builder(self.function("plan_scan"));
        b.arg(&*table.slice)
            .arg(&*plan.expert_counts.slice)
            .arg(&*plan.expert_offsets.slice)
            .arg(&dims);
        // SAFETY: plan_scan(unsigned*, int*, int*, PlanDims), one block.
        unsafe { b.launch(Self::one_block()) }.map_err(driver("plan_scan"))?;
        let mut b = self.stream.launch_builder(self.function("plan_scatter"));
        b.arg(&*experts_sel.slice)
            .arg(&*weights_sel.slice)
            .arg(&*counts_sel.slice)
            .arg(&*table.slice)
            .arg(&*plan.route_tokens.slice)
            .arg(&*plan.route_weights.slice)
            .arg(&*plan.token_routes.slice)
            .arg(&dims);
        // SAFETY: plan_scatter(const int*, const float*, const int*, unsigned*, int*,
        // float*, int*, PlanDims).
        unsafe { b.launch(Self::thread_grid(chunks)) }.map_err(driver("plan_scatter"))?;
        Ok(plan)
    }

    /// `out[m] = x[route_tokens[m]]` for `rows` routes of `hidden` values.
    pub fn gather(
        &self,
        x: &DeviceBuffer,
        hidden: usize,
        plan: &DispatchBuffers,
        rows: usize,
        experts: usize,
    ) -> Result<DeviceBuffer, CudaError> {
        let index = [&plan.route_tokens, &plan.expert_offsets];
        self.move_rows("gather", index, x, hidden, rows, experts)
    }

    /// `out[i] = sum_s route_weights[m] y[m]`, `m = token_routes[i, s]`, for `rows` tokens.
    pub fn combine(
        &self,
        y: &DeviceBuffer,
        hidden: usize,
        plan: &DispatchBuffers,
        rows: usize,
        experts: usize,
    ) -> Result<DeviceBuffer, CudaError> {
        let index = [&plan.token_routes, &plan.route_weights];
        self.move_rows("combine", index, y, hidden, rows, experts)
    }

    /// Launches `gather` or `combine`, which share one signature: two plan arrays, the
    /// rows to move, the output, then rows, hidden and experts; one thread per output
    /// element.
    fn move_rows(
        &self,
        kernel: &'static str,
        [plan_a, plan_b]: [&DeviceBuffer; 2],
        src: &DeviceBuffer,
        hidden: usize,
        rows: usize,
        experts: usize,
    ) -> Result<DeviceBuffer, CudaError> {
        let out = self.zeros(kernel, rows * hidden)?;
        let (r, h, e) = (rows as u32, hidden as u32, experts as u32);
        let mut b = self.stream.launch_builder(self.function(kernel));
        b.arg(&*plan_a.slice)
            .arg(&*plan_b.slice)
            .arg(&*src.slice)
            .arg(&*out.slice)
            .arg(&r)
            .arg(&h)
            .arg(&e);
        // SAFETY: gather(const int*, const int*, const float*, float*, unsigned x3) and
        // combine(const int*, const float*, const float*, float*, unsigned x3): four
        // device pointers then three unsigned, as pushed above.
        unsafe { b.launch(Self::thread_grid(rows * hidden)) }.map_err(driver(kernel))?;
        Ok(out)
    }

    /// `out[m] = x[m] W_e` for the rows `m` in `offsets[e]..offsets[e + 1]` (`E + 1`
    /// i32 on the device, from 0) of every expert, zeros from `offsets[E]` to `rows`; `w`
    /// is `[E, inner, cols]`, or `[E, cols, inner]` read transposed. f32 in and out; the
    /// products in `precision` (bf16 and f16 on the tensor cores). Nothing is read back.
    pub fn grouped_matmul(
        &self,
        x: &DeviceBuffer,
        w: &DeviceBuffer,
        offsets: &DeviceBuffer,
        [rows, inner, cols, experts]: [usize; 4],
        transposed: bool,
        precision: GemmPrecision,
    ) -> Result<DeviceBuffer, CudaError> {
        Self::check_size("grouped_matmul", rows * cols.max(inner))?;
        Self::check_size("grouped_matmul", experts * inner * cols)?;
        let out = self.zeros("grouped_matmul", rows * cols)?;
        if rows * cols == 0 || experts == 0 {
            return Ok(out);
        }
        let (kernel, threads) = match precision {
            GemmPrecision::F32 => ("grouped_forward_f32", 256),
            GemmPrecision::Bf16 => ("grouped_forward_bf16", 128),
            GemmPrecision::F16 => ("grouped_forward_f16", 128),
        };
        // Row tiles: a bound on the experts' tiles (each wastes less than one).
        let row_tiles = rows.div_ceil(GEMM_TILE) + experts;
        if row_tiles > 65_535 {
            return Err(CudaError::TooLarge {
                what: "grouped_matmul row tiles".to_string(),
                elements: row_tiles as u64,
                limit: 65_535,
            });
        }
        let config = LaunchConfig {
            grid_dim: (cols.div_ceil(GEMM_TILE) as u32, row_tiles as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let dims = GroupedDims::new([rows, inner, cols, experts], transposed);
        let mut b = self.stream.launch_builder(self.function(kernel));
        b.arg(&*offsets.slice)
            .arg(&*x.slice)
            .arg(&*w.slice)
            .arg(&*out.slice)
            .arg(&dims);
        // SAFETY: grouped_forward_*(const int*, const float*, const float*, float*,
        // GroupedDims): four device pointers then the struct, as pushed above.
        unsafe { b.launch(config) }.map_err(driver(kernel))?;
        Ok(out)
    }

    /// `out[e] = x_e^T g_e` (`[E, inner, cols]`) over each expert's rows as in
    /// [`Self::grouped_matmul`]; zeros for an expert without rows. f32.
    pub fn grouped_weight_grad(
        &self,
        x: &DeviceBuffer,
        g: &DeviceBuffer,
        offsets: &DeviceBuffer,
        [rows, inner, cols, experts]: [usize; 4],
    ) -> Result<DeviceBuffer, CudaError> {
        Self::check_size("grouped_weight_grad", experts * inner * cols)?;
        let out = self.zeros("grouped_weight_grad", experts * inner * cols)?;
        if experts * inner * cols == 0 {
            return Ok(out);
        }
        if experts > 65_535 {
            return Err(CudaError::TooLarge {
                what: "grouped_weight_grad experts".to_string(),
                elements: experts as u64,
                limit: 65_535,
            });
        }
        let config = LaunchConfig {
            grid_dim: (
                cols.div_ceil(GEMM_TILE) as u32,
                inner.div_ceil(GEMM_TILE) as u32,
                experts as u32,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let dims = GroupedDims::new([rows, inner, cols, experts], false);
        let kernel = "grouped_weight_grad_f32";
        let mut b = self.stream.launch_builder(self.function(kernel));
        b.arg(&*offsets.slice)
            .arg(&*x.slice)
            .arg(&*g.slice)
            .arg(&*out.slice)
            .arg(&dims);
        // SAFETY: grouped_weight_grad_f32(const int*, const float*, const float*, float*,
        // GroupedDims), as pushed above.
        unsafe { b.launch(config) }.map_err(driver(kernel))?;
        Ok(out)
    }

    /// One PI update of the device-resident `state` from `len` per-token counts.
    #[allow(clippy::too_many_arguments)]
    pub fn controller_update(
        &self,
        state: &DeviceBuffer,
        counts: &DeviceBuffer,
        len: usize,
        experts: usize,
        target: f32,
        (kp, ki): (f32, f32),
        (p_min, p_max): (f32, f32),
    ) -> Result<(), CudaError> {
        let law = ControllerParams {
            len: len as u32,
            experts: experts as u32,
            target,
            kp,
            ki,
            p_min,
            p_max,
            per: len as f32,
        };
        let mut b = self
            .stream
            .launch_builder(self.function("controller_update"));
        b.arg(&*counts.slice).arg(&*state.slice).arg(&law);
        // SAFETY: controller_update(const int*, float*, ControllerParams), one block of
        // 256 threads (its shared array is 256 long): one controller.
        unsafe { b.launch(Self::one_block()) }.map_err(driver("controller_update"))?;
        Ok(())
    }
}
