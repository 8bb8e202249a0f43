//! Pipelines compiled once, buffers, and one launcher per routing op.

use bytemuck::Pod;
use wgpu::util::DeviceExt;

use crate::context::GpuContext;
use crate::error::ShaderError;
use crate::params::{
    ControllerParams, DrnParams, GroupedParams, MoveParams, PlanParams, RowParams, SelectParams,
};
use crate::source;

/// Threads per workgroup of the per-token and per-element kernels (the WGSL `WG`
/// override). 64 fits every device, browsers' 256-invocation limit included.
const WG: u32 = 64;
/// Threads of the single-workgroup reductions (`plan_scan`, `controller_update`).
const WG_WIDE: u32 = 256;
/// Tokens per chunk of the dispatch plan: one thread walks a chunk in order.
const PLAN_CHUNK: u32 = 32;
/// Largest E the selection kernels handle on lavapipe (see `check_select_experts`).
const LAVAPIPE_MAX_SELECT_EXPERTS: usize = 512;
/// The grouped products' workgroup tile (`TILE_M` x `TILE_N` outputs, `TILE_K` deep), the
/// `override`s of grouped_matmul.wgsl: 16 outputs per thread in registers, 256 threads and
/// 8 KiB of shared memory (within every device's limits, browsers' included). Measured on
/// lavapipe, bench/cpu-mid.toml: 61.9 tokens/s at 32 x 32 x 16, 66.1 at 64 x 32 x 16,
/// 71.5 here, 73.0 at 64 x 64 x 32 (16 KiB, past a browser's limit); docs/benchmarks.md.
pub const GROUPED_TILE: [u32; 3] = [64, 64, 16];
const GROUPED_MICRO: u32 = 4;

/// The grouped products' tile: [`GROUPED_TILE`], or `DTOPP_GROUPED_TILE=M,N,K` to try
/// another on a device (M and N multiples of 4, at most 256 threads and 16 KiB of
/// workgroup memory; anything else is ignored, saying so).
fn grouped_tile() -> [u32; 3] {
    let Ok(given) = std::env::var("DTOPP_GROUPED_TILE") else {
        return GROUPED_TILE;
    };
    let t: Vec<u32> = given
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect();
    let fits = t.len() == 3
        && t.iter().all(|&v| v > 0)
        && t[0].is_multiple_of(GROUPED_MICRO)
        && t[1].is_multiple_of(GROUPED_MICRO)
        && (t[0] / GROUPED_MICRO) * (t[1] / GROUPED_MICRO) <= 256
        && (t[0] + t[1]) * t[2] * 4 <= 16 * 1024 - 64;
    if fits {
        [t[0], t[1], t[2]]
    } else {
        eprintln!(
            "DTOPP_GROUPED_TILE={given} ignored: want M,N,K with M and N multiples of 4, (M/4)(N/4) <= 256 threads and (M + N) K floats within 16 KiB; using {GROUPED_TILE:?}"
        );
        GROUPED_TILE
    }
}
/// `status` value meaning "no non-finite input seen".
const STATUS_CLEAN: u32 = u32::MAX;

/// How a binding is used. Inputs are storage like outputs (read_write in the WGSL): burn
/// keeps many tensors in one pooled buffer, and wgpu tracks usage per buffer, refusing one
/// bound read-only and read-write in the same dispatch.
#[derive(Clone, Copy, Debug)]
enum Slot {
    Uniform,
    Storage,
}

/// One entry point: its pipeline, its explicit bind-group layout, and the binding
/// numbers (in the order `run` receives buffers; the uniform params come first).
#[derive(Debug)]
struct Kernel {
    name: &'static str,
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    bindings: &'static [(u32, Slot)],
}

/// The buffers of a dispatch plan (see `dtopp::ops::DispatchPlan` for the layout).
#[derive(Clone, Debug)]
pub struct DispatchBuffers {
    /// `[E]` i32.
    pub expert_counts: wgpu::Buffer,
    /// `[E + 1]` i32.
    pub expert_offsets: wgpu::Buffer,
    /// `[capacity]` i32.
    pub route_tokens: wgpu::Buffer,
    /// `[capacity]` f32.
    pub route_weights: wgpu::Buffer,
    /// `[N, E]` i32.
    pub token_routes: wgpu::Buffer,
}

/// The buffers of a selection.
#[derive(Clone, Debug)]
pub struct SelectionBuffers {
    /// `[N, E]` i32.
    pub experts: wgpu::Buffer,
    /// `[N, E]` f32.
    pub weights: wgpu::Buffer,
    /// `[N]` i32.
    pub counts: wgpu::Buffer,
    /// `[1]` u32: index of the first non-finite probability, or `u32::MAX`.
    pub status: wgpu::Buffer,
}

/// The PI law's settings (DESIGN.md section 1), as the controller kernel takes them.
#[derive(Clone, Copy, Debug)]
pub struct ControllerLaw {
    /// `E`, experts per layer (the error is normalised by it).
    pub experts: usize,
    /// `T`, the target mean of activated experts.
    pub target: f32,
    /// `(Kp, Ki)`.
    pub gains: (f32, f32),
    /// `(p_min, p_max)`.
    pub clamp: (f32, f32),
}

/// What [`RoutingKernels::drn_backward_into`] reads.
#[derive(Clone, Copy, Debug)]
pub struct DrnBackwardIn<'a> {
    /// `[N, E]` f32 router logits.
    pub logits: Bound<'a>,
    /// `[1]` f32 theta.
    pub theta: Bound<'a>,
    /// `[N, E]` f32 probabilities of the forward pass.
    pub probs: Bound<'a>,
    /// `[N, E]` f32 dL/dP.
    pub grad_probs: Bound<'a>,
}

/// What [`RoutingKernels::drn_backward_into`] writes.
#[derive(Clone, Copy, Debug)]
pub struct DrnBackwardOut<'a> {
    /// `[N, E]` f32 dL/dz.
    pub grad_logits: Bound<'a>,
    /// `[N]` f32 scratch: each token's share of dL/dtheta.
    pub theta_partials: Bound<'a>,
    /// `[1]` f32 dL/dtheta.
    pub grad_theta: Bound<'a>,
    /// `[1]` u32, set to `u32::MAX` by the caller: the first non-finite input.
    pub status: Bound<'a>,
}

/// A bound range of a storage buffer: a whole buffer of this crate's, or the slice of a
/// pooled buffer that holds one of burn's tensors (burn-wgpu keeps many tensors in one
/// `wgpu::Buffer`; `offset` is a multiple of the device's storage offset alignment).
#[derive(Clone, Copy, Debug)]
pub struct Bound<'a> {
    /// The buffer.
    pub buffer: &'a wgpu::Buffer,
    /// Where the range starts, in bytes.
    pub offset: u64,
    /// Its length in bytes.
    pub size: u64,
}

impl<'a> From<&'a wgpu::Buffer> for Bound<'a> {
    fn from(buffer: &'a wgpu::Buffer) -> Self {
        Self {
            buffer,
            offset: 0,
            size: buffer.size(),
        }
    }
}

impl Bound<'_> {
    fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: self.buffer,
            offset: self.offset,
            size: wgpu::BufferSize::new(self.size),
        })
    }
}

/// Where a selection is written: `[N, E]` i32 experts, `[N, E]` f32 weights, `[N]` i32
/// counts and a `[1]` u32 status, which the caller initialises to `u32::MAX`.
#[derive(Clone, Copy, Debug)]
pub struct SelectionOut<'a> {
    /// `[N, E]` i32.
    pub experts: Bound<'a>,
    /// `[N, E]` f32.
    pub weights: Bound<'a>,
    /// `[N]` i32.
    pub counts: Bound<'a>,
    /// `[1]` u32.
    pub status: Bound<'a>,
}

/// Where a dispatch plan is written (layout of [`DispatchBuffers`]), with the plan's
/// scratch table `chunk_offsets` (`[ceil(N / 32), E]` u32, [`RoutingKernels::plan_chunks`]).
#[derive(Clone, Copy, Debug)]
pub struct PlanOut<'a> {
    /// `[num_chunks, E]` u32 scratch.
    pub chunk_offsets: Bound<'a>,
    /// `[E]` i32.
    pub expert_counts: Bound<'a>,
    /// `[E + 1]` i32.
    pub expert_offsets: Bound<'a>,
    /// `[capacity]` i32.
    pub route_tokens: Bound<'a>,
    /// `[capacity]` f32.
    pub route_weights: Bound<'a>,
    /// `[N, E]` i32.
    pub token_routes: Bound<'a>,
}

impl SelectionBuffers {
    fn bound(&self) -> SelectionOut<'_> {
        SelectionOut {
            experts: (&self.experts).into(),
            weights: (&self.weights).into(),
            counts: (&self.counts).into(),
            status: (&self.status).into(),
        }
    }
}

/// Every routing kernel, compiled for one device.
#[derive(Debug)]
pub struct RoutingKernels {
    ctx: GpuContext,
    drn_forward: Kernel,
    drn_backward: Kernel,
    drn_theta_sum: Kernel,
    top_p: Kernel,
    top_k: Kernel,
    plan_count: Kernel,
    plan_scan: Kernel,
    plan_scatter: Kernel,
    gather: Kernel,
    combine: Kernel,
    gather_rows: Kernel,
    sum_rows: Kernel,
    row_dots: Kernel,
    controller_update: Kernel,
    grouped_forward: Kernel,
    grouped_weight_grad: Kernel,
    grouped_tile: [u32; 3],
}

use Slot::{Storage, Uniform};

impl RoutingKernels {
    /// Compiles every shader and pipeline on the context's device (once; reuse it).
    pub fn new(ctx: GpuContext) -> Self {
        let device = &ctx.device;
        let module = |label: &str, text: &str| {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(text.into()),
            })
        };
        let drn = module("drn.wgsl", source::DRN);
        let select = module("select.wgsl", source::SELECT);
        let dispatch = module("dispatch.wgsl", source::DISPATCH);
        let moves = module("gather_combine.wgsl", source::GATHER_COMBINE);
        let rows = module("rows.wgsl", source::ROWS);
        let controller = module("controller.wgsl", source::CONTROLLER);
        let grouped = module("grouped_matmul.wgsl", source::GROUPED_MATMUL);
        let grouped_tile = grouped_tile();
        let [tile_m, tile_n, tile_k] = grouped_tile.map(f64::from);
        let threads = (grouped_tile[0] / GROUPED_MICRO) * (grouped_tile[1] / GROUPED_MICRO);
        let tiles: &[(&str, f64)] = &[
            ("TILE_M", tile_m),
            ("TILE_N", tile_n),
            ("TILE_K", tile_k),
            ("WG", f64::from(threads)),
        ];
        let tiled = |name, b| Self::kernel_with(device, &grouped, name, tiles, b);
        let k = |m: &wgpu::ShaderModule, name, wg, b| Self::kernel(device, m, name, wg, b);
        Self {
            drn_forward: k(
                &drn,
                "drn_forward",
                WG,
                &[
                    (0, Uniform),
                    (1, Storage),
                    (2, Storage),
                    (3, Storage),
                    (9, Storage),
                ],
            ),
            drn_backward: k(
                &drn,
                "drn_backward",
                WG,
                &[
                    (0, Uniform),
                    (1, Storage),
                    (3, Storage),
                    (4, Storage),
                    (5, Storage),
                    (6, Storage),
                    (7, Storage),
                    (9, Storage),
                ],
            ),
            drn_theta_sum: k(
                &drn,
                "drn_theta_sum",
                WG,
                &[(0, Uniform), (7, Storage), (8, Storage)],
            ),
            top_p: k(
                &select,
                "top_p",
                WG,
                &[
                    (0, Uniform),
                    (1, Storage),
                    (2, Storage),
                    (3, Storage),
                    (4, Storage),
                    (5, Storage),
                    (6, Storage),
                ],
            ),
            top_k: k(
                &select,
                "top_k",
                WG,
                &[
                    (0, Uniform),
                    (1, Storage),
                    (3, Storage),
                    (4, Storage),
                    (5, Storage),
                    (6, Storage),
                ],
            ),
            plan_count: k(
                &dispatch,
                "plan_count",
                WG,
                &[(0, Uniform), (1, Storage), (3, Storage), (4, Storage)],
            ),
            plan_scan: k(
                &dispatch,
                "plan_scan",
                WG_WIDE,
                &[(0, Uniform), (4, Storage), (5, Storage), (6, Storage)],
            ),
            plan_scatter: k(
                &dispatch,
                "plan_scatter",
                WG,
                &[
                    (0, Uniform),
                    (1, Storage),
                    (2, Storage),
                    (3, Storage),
                    (4, Storage),
                    (7, Storage),
                    (8, Storage),
                    (9, Storage),
                ],
            ),
            gather: k(
                &moves,
                "gather",
                WG,
                &[
                    (0, Uniform),
                    (1, Storage),
                    (2, Storage),
                    (3, Storage),
                    (4, Storage),
                ],
            ),
            combine: k(
                &moves,
                "combine",
                WG,
                &[
                    (0, Uniform),
                    (5, Storage),
                    (6, Storage),
                    (7, Storage),
                    (8, Storage),
                ],
            ),
            gather_rows: k(
                &rows,
                "gather_rows",
                WG,
                &[(0, Uniform), (1, Storage), (2, Storage), (3, Storage)],
            ),
            sum_rows: k(
                &rows,
                "sum_rows",
                WG,
                &[
                    (0, Uniform),
                    (4, Storage),
                    (5, Storage),
                    (6, Storage),
                    (7, Storage),
                ],
            ),
            row_dots: k(
                &rows,
                "row_dots",
                WG,
                &[(0, Uniform), (8, Storage), (9, Storage), (10, Storage)],
            ),
            controller_update: k(
                &controller,
                "controller_update",
                WG_WIDE,
                &[(0, Uniform), (1, Storage), (2, Storage)],
            ),
            grouped_forward: tiled(
                "grouped_forward",
                &[
                    (0, Uniform),
                    (1, Storage),
                    (2, Storage),
                    (3, Storage),
                    (4, Storage),
                ],
            ),
            grouped_weight_grad: tiled(
                "grouped_weight_grad",
                &[
                    (0, Uniform),
                    (1, Storage),
                    (2, Storage),
                    (5, Storage),
                    (6, Storage),
                ],
            ),
            grouped_tile,
            ctx,
        }
    }

    fn kernel(
        device: &wgpu::Device,
        module: &wgpu::ShaderModule,
        name: &'static str,
        workgroup: u32,
        bindings: &'static [(u32, Slot)],
    ) -> Kernel {
        let constants = [("WG", f64::from(workgroup))];
        Self::kernel_with(device, module, name, &constants, bindings)
    }

    fn kernel_with(
        device: &wgpu::Device,
        module: &wgpu::ShaderModule,
        name: &'static str,
        constants: &[(&str, f64)],
        bindings: &'static [(u32, Slot)],
    ) -> Kernel {
        let entries: Vec<wgpu::BindGroupLayoutEntry> = bindings
            .iter()
            .map(|&(binding, slot)| wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match slot {
                        Uniform => wgpu::BufferBindingType::Uniform,
                        Storage => wgpu::BufferBindingType::Storage { read_only: false },
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(name),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(name),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(name),
            layout: Some(&pipeline_layout),
            module,
            entry_point: Some(name),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        Kernel {
            name,
            pipeline,
            layout,
            bindings,
        }
    }

    /// The device the kernels run on.
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    fn check_size(&self, what: &str, bytes: u64) -> Result<(), ShaderError> {
        let limits = self.ctx.device.limits();
        let limit = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        if bytes > limit {
            return Err(ShaderError::TooLarge {
                what: what.to_string(),
                bytes,
                limit,
                adapter: self.ctx.adapter_name(),
            });
        }
        Ok(())
    }

    /// A storage buffer holding `data` (at least 4 bytes, so it can be bound).
    pub fn upload<T: Pod>(&self, what: &str, data: &[T]) -> Result<wgpu::Buffer, ShaderError> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        self.check_size(what, bytes.len() as u64)?;
        let padded;
        let contents = if bytes.len() < 4 {
            padded = [bytes, &[0u8; 4][..4 - bytes.len()]].concat();
            &padded[..]
        } else {
            bytes
        };
        Ok(self
            .ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(what),
                contents,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
            }))
    }

    /// An uninitialised storage buffer of `elements` 4-byte values.
    pub fn storage(&self, what: &str, elements: usize) -> Result<wgpu::Buffer, ShaderError> {
        let bytes = (elements.max(1) * 4) as u64;
        self.check_size(what, bytes)?;
        Ok(self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(what),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }))
    }

    fn status(&self, what: &str) -> Result<wgpu::Buffer, ShaderError> {
        self.upload(what, &[STATUS_CLEAN])
    }

    /// Copies `len` values of a buffer back to the host (blocks until the queue is done;
    /// native only: on the web use [`RoutingKernels::read_async`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read<T: Pod>(&self, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<T>, ShaderError> {
        pollster::block_on(self.read_async(buffer, len))
    }

    /// Copies `len` values of a buffer back to the host.
    pub async fn read_async<T: Pod>(
        &self,
        buffer: &wgpu::Buffer,
        len: usize,
    ) -> Result<Vec<T>, ShaderError> {
        let mut out = self.read_many_async::<T>(&[(buffer, len)]).await?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Copies the first `len` values of each buffer back to the host through one staging
    /// buffer and one mapping: in the browser every mapping waits for the event loop, so
    /// a step's results are read together.
    pub async fn read_many_async<T: Pod>(
        &self,
        buffers: &[(&wgpu::Buffer, usize)],
    ) -> Result<Vec<Vec<T>>, ShaderError> {
        let sizes: Vec<u64> = buffers
            .iter()
            .map(|&(_, len)| (len * size_of::<T>()) as u64)
            .collect();
        // Copies start on 4-byte boundaries (wgpu::COPY_BUFFER_ALIGNMENT).
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut total = 0u64;
        for &bytes in &sizes {
            offsets.push(total);
            total += bytes.next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT);
        }
        if total == 0 {
            return Ok(vec![Vec::new(); buffers.len()]);
        }
        let device = &self.ctx.device;
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("read back"),
            size: total,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("read back"),
        });
        for ((&(buffer, _), &bytes), &offset) in buffers.iter().zip(&sizes).zip(&offsets) {
            if bytes > 0 {
                encoder.copy_buffer_to_buffer(buffer, 0, &staging, offset, bytes);
            }
        }
        self.ctx.queue.submit([encoder.finish()]);
        let mapped = MapFuture::default();
        let done = mapped.clone();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            done.complete(r.map_err(|e| e.to_string()))
        });
        // Native: drive the device until the copy and the mapping are done. On the web the
        // browser's event loop does it and the future below resolves when it has.
        #[cfg(not(target_arch = "wasm32"))]
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| ShaderError::ReadBack(e.to_string()))?;
        mapped.await.map_err(ShaderError::ReadBack)?;
        let out = {
            let view = staging.slice(..).get_mapped_range();
            sizes
                .iter()
                .zip(&offsets)
                .map(|(&bytes, &offset)| {
                    let range = offset as usize..(offset + bytes) as usize;
                    bytemuck::cast_slice::<u8, T>(&view[range]).to_vec()
                })
                .collect()
        };
        staging.unmap();
        Ok(out)
    }

    /// Workgroups for `n` groups as a 2-D grid within the per-dimension limit.
    fn grid(&self, what: &str, groups: u64) -> Result<(u32, u32), ShaderError> {
        let max = u64::from(
            self.ctx
                .device
                .limits()
                .max_compute_workgroups_per_dimension,
        );
        let groups = groups.max(1);
        let x = groups.min(max);
        let y = groups.div_ceil(x);
        if y > max {
            return Err(ShaderError::TooLarge {
                what: format!("{what}: {groups} workgroups"),
                bytes: groups,
                limit: max * max,
                adapter: self.ctx.adapter_name(),
            });
        }
        Ok((x as u32, y as u32))
    }

    /// Workgroups of `WG` threads covering `threads` threads.
    fn thread_grid(&self, what: &str, threads: usize) -> Result<(u32, u32), ShaderError> {
        self.grid(what, (threads as u64).div_ceil(u64::from(WG)))
    }

    fn run(&self, kernel: &Kernel, params: &[u8], buffers: &[Bound<'_>], grid: (u32, u32)) {
        let device = &self.ctx.device;
        let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(kernel.name),
            contents: params,
            usage: wgpu::BufferUsages::UNIFORM,
        });
        debug_assert_eq!(buffers.len() + 1, kernel.bindings.len(), "{}", kernel.name);
        let entries: Vec<wgpu::BindGroupEntry> = kernel
            .bindings
            .iter()
            .zip(
                std::iter::once(uniform.as_entire_binding())
                    .chain(buffers.iter().map(Bound::binding)),
            )
            .map(|(&(binding, _), resource)| wgpu::BindGroupEntry { binding, resource })
            .collect();
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.name),
            layout: &kernel.layout,
            entries: &entries,
        });
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some(kernel.name),
        });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(kernel.name),
                timestamp_writes: None,
            });
            pass.set_pipeline(&kernel.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(grid.0, grid.1, 1);
        }
        self.ctx.queue.submit([encoder.finish()]);
    }

    fn drn_params(tokens: usize, experts: usize, use_drn: bool) -> DrnParams {
        DrnParams {
            tokens: tokens as u32,
            experts: experts as u32,
            use_drn: u32::from(use_drn),
            eps: 1e-6,
            _pad: [0; 4],
        }
    }

    /// DRN (`theta: Some`) or plain softmax (`None`) of `[N, E]` logits. Returns the
    /// probabilities and a status buffer (first non-finite logit index, or `u32::MAX`).
    pub fn drn_forward(
        &self,
        logits: &wgpu::Buffer,
        tokens: usize,
        experts: usize,
        theta: Option<f32>,
    ) -> Result<(wgpu::Buffer, wgpu::Buffer), ShaderError> {
        let probs = self.storage("probs", tokens * experts)?;
        let status = self.status("drn status")?;
        let theta_buf = self.upload("theta", &[theta.unwrap_or(1.0)])?;
        self.drn_forward_into(
            logits.into(),
            (&theta_buf).into(),
            [tokens, experts],
            theta.is_some(),
            (&probs).into(),
            (&status).into(),
        )?;
        Ok((probs, status))
    }

    /// [`RoutingKernels::drn_forward`] into ranges the caller owns (burn's tensors), with
    /// theta read from `theta[0]` on the device. `status` must hold `u32::MAX` (all bits
    /// set); it receives the first non-finite logit's index.
    pub fn drn_forward_into(
        &self,
        logits: Bound<'_>,
        theta: Bound<'_>,
        [tokens, experts]: [usize; 2],
        use_drn: bool,
        probs: Bound<'_>,
        status: Bound<'_>,
    ) -> Result<(), ShaderError> {
        let params = Self::drn_params(tokens, experts, use_drn);
        let grid = self.thread_grid("drn_forward", tokens)?;
        self.run(
            &self.drn_forward,
            bytemuck::bytes_of(&params),
            &[logits, probs, status, theta],
            grid,
        );
        Ok(())
    }

    /// Backward of [`RoutingKernels::drn_forward`]: returns dL/dz `[N, E]`, dL/dtheta
    /// `[1]`, and a status buffer (first non-finite logit or gradient).
    pub fn drn_backward(
        &self,
        logits: &wgpu::Buffer,
        probs: &wgpu::Buffer,
        grad_probs: &wgpu::Buffer,
        tokens: usize,
        experts: usize,
        theta: Option<f32>,
    ) -> Result<(wgpu::Buffer, wgpu::Buffer, wgpu::Buffer), ShaderError> {
        let grad_logits = self.storage("grad logits", tokens * experts)?;
        let partials = self.storage("theta partials", tokens)?;
        let grad_theta = self.storage("grad theta", 1)?;
        let status = self.status("drn backward status")?;
        let theta_buf = self.upload("theta", &[theta.unwrap_or(1.0)])?;
        self.drn_backward_into(
            DrnBackwardIn {
                logits: logits.into(),
                theta: (&theta_buf).into(),
                probs: probs.into(),
                grad_probs: grad_probs.into(),
            },
            [tokens, experts],
            theta.is_some(),
            DrnBackwardOut {
                grad_logits: (&grad_logits).into(),
                theta_partials: (&partials).into(),
                grad_theta: (&grad_theta).into(),
                status: (&status).into(),
            },
        )?;
        Ok((grad_logits, grad_theta, status))
    }

    /// [`RoutingKernels::drn_backward`] into ranges the caller owns, theta read from the
    /// device. `out.theta_partials` holds N floats of scratch; `out.status` must hold
    /// `u32::MAX`.
    pub fn drn_backward_into(
        &self,
        input: DrnBackwardIn<'_>,
        [tokens, experts]: [usize; 2],
        use_drn: bool,
        out: DrnBackwardOut<'_>,
    ) -> Result<(), ShaderError> {
        let params = Self::drn_params(tokens, experts, use_drn);
        let grid = self.thread_grid("drn_backward", tokens)?;
        self.run(
            &self.drn_backward,
            bytemuck::bytes_of(&params),
            &[
                input.logits,
                out.status,
                input.probs,
                input.grad_probs,
                out.grad_logits,
                out.theta_partials,
                input.theta,
            ],
            grid,
        );
        self.run(
            &self.drn_theta_sum,
            bytemuck::bytes_of(&params),
            &[out.theta_partials, out.grad_theta],
            (1, 1),
        );
        Ok(())
    }

    fn select_params(tokens: usize, experts: usize, k: usize, k_max: usize) -> SelectParams {
        SelectParams {
            tokens: tokens as u32,
            experts: experts as u32,
            k: k as u32,
            k_max: k_max as u32,
        }
    }

    /// lavapipe ends an outermost shader loop after 65535 iterations (nested loops
    /// included); the selection scan stays under that for E <= 512 (see select.wgsl).
    fn check_select_experts(&self, op: &'static str, experts: usize) -> Result<(), ShaderError> {
        if experts > LAVAPIPE_MAX_SELECT_EXPERTS && self.ctx.info.name.contains("llvmpipe") {
            return Err(ShaderError::Unsupported {
                op,
                message: format!(
                    "E = {experts} experts on {}: lavapipe caps shader loops at 65535 iterations, which limits the WGSL selection to E <= {LAVAPIPE_MAX_SELECT_EXPERTS} there (use --backend cpu, or a GPU)",
                    self.ctx.adapter_name()
                ),
            });
        }
        Ok(())
    }

    fn selection_buffers(
        &self,
        tokens: usize,
        experts: usize,
    ) -> Result<SelectionBuffers, ShaderError> {
        Ok(SelectionBuffers {
            experts: self.storage("selected experts", tokens * experts)?,
            weights: self.storage("combine weights", tokens * experts)?,
            counts: self.storage("expert counts per token", tokens)?,
            status: self.status("selection status")?,
        })
    }

    /// Top-p selection; `threshold` is a device buffer whose first value is `p`;
    /// `k_max` caps the count (`None`: no cap).
    pub fn top_p(
        &self,
        probs: &wgpu::Buffer,
        tokens: usize,
        experts: usize,
        threshold: &wgpu::Buffer,
        k_max: Option<usize>,
    ) -> Result<SelectionBuffers, ShaderError> {
        let out = self.selection_buffers(tokens, experts)?;
        self.top_p_into(
            probs.into(),
            threshold.into(),
            tokens,
            experts,
            k_max,
            out.bound(),
        )?;
        Ok(out)
    }

    /// [`RoutingKernels::top_p`] into ranges the caller owns (burn's tensors).
    pub fn top_p_into(
        &self,
        probs: Bound<'_>,
        threshold: Bound<'_>,
        tokens: usize,
        experts: usize,
        k_max: Option<usize>,
        out: SelectionOut<'_>,
    ) -> Result<(), ShaderError> {
        self.check_select_experts("top_p", experts)?;
        let params = Self::select_params(tokens, experts, 0, k_max.unwrap_or(0));
        let grid = self.thread_grid("top_p", tokens)?;
        self.run(
            &self.top_p,
            bytemuck::bytes_of(&params),
            &[
                probs,
                threshold,
                out.experts,
                out.weights,
                out.counts,
                out.status,
            ],
            grid,
        );
        Ok(())
    }

    /// Top-k selection.
    pub fn top_k(
        &self,
        probs: &wgpu::Buffer,
        tokens: usize,
        experts: usize,
        k: usize,
    ) -> Result<SelectionBuffers, ShaderError> {
        let out = self.selection_buffers(tokens, experts)?;
        self.top_k_into(probs.into(), tokens, experts, k, out.bound())?;
        Ok(out)
    }

    /// [`RoutingKernels::top_k`] into ranges the caller owns (burn's tensors).
    pub fn top_k_into(
        &self,
        probs: Bound<'_>,
        tokens: usize,
        experts: usize,
        k: usize,
        out: SelectionOut<'_>,
    ) -> Result<(), ShaderError> {
        self.check_select_experts("top_k", experts)?;
        let params = Self::select_params(tokens, experts, k, 0);
        let grid = self.thread_grid("top_k", tokens)?;
        self.run(
            &self.top_k,
            bytemuck::bytes_of(&params),
            &[probs, out.experts, out.weights, out.counts, out.status],
            grid,
        );
        Ok(())
    }

    /// Rows of the dispatch plan's scratch table `chunk_offsets` (`[rows, E]` u32).
    pub fn plan_chunks(tokens: usize) -> usize {
        tokens.div_ceil(PLAN_CHUNK as usize)
    }

    /// The dispatch plan of a selection, with route arrays of `capacity >= M` entries.
    pub fn dispatch_plan(
        &self,
        experts_sel: &wgpu::Buffer,
        weights_sel: &wgpu::Buffer,
        counts_sel: &wgpu::Buffer,
        tokens: usize,
        experts: usize,
        capacity: usize,
    ) -> Result<DispatchBuffers, ShaderError> {
        let chunk_offsets =
            self.storage("plan chunk offsets", Self::plan_chunks(tokens) * experts)?;
        let plan = DispatchBuffers {
            expert_counts: self.storage("expert counts", experts)?,
            expert_offsets: self.storage("expert offsets", experts + 1)?,
            route_tokens: self.storage("route tokens", capacity)?,
            route_weights: self.storage("route weights", capacity)?,
            token_routes: self.storage("token routes", tokens * experts)?,
        };
        self.dispatch_plan_into(
            [experts_sel.into(), weights_sel.into(), counts_sel.into()],
            tokens,
            experts,
            PlanOut {
                chunk_offsets: (&chunk_offsets).into(),
                expert_counts: (&plan.expert_counts).into(),
                expert_offsets: (&plan.expert_offsets).into(),
                route_tokens: (&plan.route_tokens).into(),
                route_weights: (&plan.route_weights).into(),
                token_routes: (&plan.token_routes).into(),
            },
        )?;
        Ok(plan)
    }

    /// [`RoutingKernels::dispatch_plan`] of a selection `[experts, weights, counts]`
    /// into ranges the caller owns (burn's tensors).
    pub fn dispatch_plan_into(
        &self,
        selection: [Bound<'_>; 3],
        tokens: usize,
        experts: usize,
        out: PlanOut<'_>,
    ) -> Result<(), ShaderError> {
        let num_chunks = Self::plan_chunks(tokens);
        let params = PlanParams {
            tokens: tokens as u32,
            experts: experts as u32,
            chunk: PLAN_CHUNK,
            num_chunks: num_chunks as u32,
        };
        let [experts_sel, weights_sel, counts_sel] = selection;
        let bytes = bytemuck::bytes_of(&params);
        let grid = self.thread_grid("dispatch_plan", num_chunks)?;
        self.run(
            &self.plan_count,
            bytes,
            &[experts_sel, counts_sel, out.chunk_offsets],
            grid,
        );
        self.run(
            &self.plan_scan,
            bytes,
            &[out.chunk_offsets, out.expert_counts, out.expert_offsets],
            (1, 1),
        );
        self.run(
            &self.plan_scatter,
            bytes,
            &[
                experts_sel,
                weights_sel,
                counts_sel,
                out.chunk_offsets,
                out.route_tokens,
                out.route_weights,
                out.token_routes,
            ],
            grid,
        );
        Ok(())
    }

    /// `out[m] = x[route_tokens[m]]`, `[capacity, hidden]`; rows past `M` are zero.
    pub fn gather(
        &self,
        x: &wgpu::Buffer,
        hidden: usize,
        plan: &DispatchBuffers,
        capacity: usize,
        experts: usize,
    ) -> Result<wgpu::Buffer, ShaderError> {
        let out = self.storage("gathered rows", capacity * hidden)?;
        let params = MoveParams {
            rows: capacity as u32,
            hidden: hidden as u32,
            experts: experts as u32,
            _pad: 0,
        };
        let grid = self.thread_grid("gather", capacity * hidden)?;
        self.run(
            &self.gather,
            bytemuck::bytes_of(&params),
            &whole(&[&plan.route_tokens, &plan.expert_offsets, x, &out]),
            grid,
        );
        Ok(out)
    }

    /// `out[i] = sum_s route_weights[m] * y[m]`, `[tokens, hidden]`.
    pub fn combine(
        &self,
        y: &wgpu::Buffer,
        hidden: usize,
        plan: &DispatchBuffers,
        tokens: usize,
        experts: usize,
    ) -> Result<wgpu::Buffer, ShaderError> {
        let out = self.storage("combined rows", tokens * hidden)?;
        let params = MoveParams {
            rows: tokens as u32,
            hidden: hidden as u32,
            experts: experts as u32,
            _pad: 0,
        };
        let grid = self.thread_grid("combine", tokens * hidden)?;
        self.run(
            &self.combine,
            bytemuck::bytes_of(&params),
            &whole(&[&plan.token_routes, &plan.route_weights, y, &out]),
            grid,
        );
        Ok(out)
    }

    /// `out[m] = src[index[m]]` (`[rows, hidden]`; zero where `index[m]` is outside
    /// `0..sources`), into ranges the caller owns (burn's tensors).
    pub fn gather_rows_into(
        &self,
        src: Bound<'_>,
        index: Bound<'_>,
        [rows, hidden, sources]: [usize; 3],
        out: Bound<'_>,
    ) -> Result<(), ShaderError> {
        let params = Self::row_params([rows, hidden, sources], 0, false);
        let grid = self.thread_grid("gather_rows", rows * hidden)?;
        self.run(
            &self.gather_rows,
            bytemuck::bytes_of(&params),
            &[index, src, out],
            grid,
        );
        Ok(())
    }

    /// `out[r] = sum_s weights[m] * values[m]` over `m = rows_of[r, s]` within
    /// `0..sources`, in slot order (`[rows, hidden]`; every weight 1 where `weights` is
    /// `None`), into ranges the caller owns.
    #[allow(clippy::too_many_arguments)]
    pub fn sum_rows_into(
        &self,
        values: Bound<'_>,
        weights: Option<Bound<'_>>,
        rows_of: Bound<'_>,
        [rows, hidden, sources, slots]: [usize; 4],
        out: Bound<'_>,
    ) -> Result<(), ShaderError> {
        let params = Self::row_params([rows, hidden, sources], slots, weights.is_some());
        let grid = self.thread_grid("sum_rows", rows * hidden)?;
        // Unweighted, the binding is bound but not read: any live range does.
        let weights = weights.unwrap_or(values);
        self.run(
            &self.sum_rows,
            bytemuck::bytes_of(&params),
            &[rows_of, weights, values, out],
            grid,
        );
        Ok(())
    }

    /// `out[m] = sum_d lhs[m, d] * rhs[m, d]` (`[rows]`), into a range the caller owns.
    pub fn row_dots_into(
        &self,
        lhs: Bound<'_>,
        rhs: Bound<'_>,
        [rows, hidden]: [usize; 2],
        out: Bound<'_>,
    ) -> Result<(), ShaderError> {
        let params = Self::row_params([rows, hidden, 0], 0, false);
        let grid = self.thread_grid("row_dots", rows)?;
        self.run(
            &self.row_dots,
            bytemuck::bytes_of(&params),
            &[lhs, rhs, out],
            grid,
        );
        Ok(())
    }

    /// `out[m] = x[m] · W_e` for the rows `m` in `offsets[e]..offsets[e + 1]` of every
    /// expert (`offsets`: `E + 1` i32 on the device, starting at 0), zeros from
    /// `offsets[E]` to `rows`; `w` is `[E, inner, cols]`, or `[E, cols, inner]` read
    /// transposed. Into ranges the caller owns; nothing is read back.
    pub fn grouped_matmul_into(
        &self,
        x: Bound<'_>,
        w: Bound<'_>,
        offsets: Bound<'_>,
        [rows, inner, cols, experts]: [usize; 4],
        transposed: bool,
        out: Bound<'_>,
    ) -> Result<(), ShaderError> {
        if rows * cols == 0 {
            return Ok(());
        }
        let [tile_m, tile_n, _] = self.grouped_tile.map(|t| t as usize);
        let col_tiles = cols.div_ceil(tile_n);
        let params = Self::grouped_params([rows, inner, cols, experts], transposed, col_tiles, 0);
        // A bound on the experts' row tiles: each expert wastes less than one.
        let slots = rows.div_ceil(tile_m) + experts;
        let grid = self.grid("grouped_matmul", (slots * col_tiles) as u64)?;
        self.run(
            &self.grouped_forward,
            bytemuck::bytes_of(&params),
            &[offsets, x, w, out],
            grid,
        );
        Ok(())
    }

    /// `out[e] = x_eᵀ · grad_e` (`[E, inner, cols]`) over the rows of each expert as in
    /// [`Self::grouped_matmul_into`]; zeros for an expert without rows.
    pub fn grouped_weight_grad_into(
        &self,
        x: Bound<'_>,
        grad: Bound<'_>,
        offsets: Bound<'_>,
        [rows, inner, cols, experts]: [usize; 4],
        out: Bound<'_>,
    ) -> Result<(), ShaderError> {
        if experts * inner * cols == 0 {
            return Ok(());
        }
        let [tile_m, tile_n, _] = self.grouped_tile.map(|t| t as usize);
        let (col_tiles, inner_tiles) = (cols.div_ceil(tile_n), inner.div_ceil(tile_m));
        let params =
            Self::grouped_params([rows, inner, cols, experts], false, col_tiles, inner_tiles);
        let groups = (experts * inner_tiles * col_tiles) as u64;
        let grid = self.grid("grouped_weight_grad", groups)?;
        self.run(
            &self.grouped_weight_grad,
            bytemuck::bytes_of(&params),
            &[offsets, x, grad, out],
            grid,
        );
        Ok(())
    }

    fn grouped_params(
        [rows, inner, cols, experts]: [usize; 4],
        transposed: bool,
        col_tiles: usize,
        inner_tiles: usize,
    ) -> GroupedParams {
        GroupedParams {
            rows: rows as u32,
            inner: inner as u32,
            cols: cols as u32,
            experts: experts as u32,
            transposed: u32::from(transposed),
            col_tiles: col_tiles as u32,
            inner_tiles: inner_tiles as u32,
            _pad: 0,
        }
    }

    fn row_params([rows, hidden, sources]: [usize; 3], slots: usize, weighted: bool) -> RowParams {
        RowParams {
            rows: rows as u32,
            hidden: hidden as u32,
            sources: sources as u32,
            slots: slots as u32,
            weighted: u32::from(weighted),
            _pad: [0; 3],
        }
    }

    /// One PI update of the device-resident controller `state` (`[p, p_0, integral,
    /// last_error, step]` f32) from `len` per-token expert counts.
    #[allow(clippy::too_many_arguments)]
    pub fn controller_update(
        &self,
        state: &wgpu::Buffer,
        counts: &wgpu::Buffer,
        len: usize,
        experts: usize,
        target: f32,
        gains: (f32, f32),
        clamp: (f32, f32),
    ) -> Result<(), ShaderError> {
        let law = ControllerLaw {
            experts,
            target,
            gains,
            clamp,
        };
        self.controllers_update_into(state.into(), counts.into(), [1, len], len as f32, law)
    }

    /// One PI update of `controllers` states `[C, 5]` (as [`Self::controller_update`]),
    /// controller c from counts `[c len, (c + 1) len)` covering `per` tokens: `a_t =
    /// sum / per`. Into ranges the caller owns (burn's tensors).
    pub fn controllers_update_into(
        &self,
        state: Bound<'_>,
        counts: Bound<'_>,
        [controllers, len]: [usize; 2],
        per: f32,
        law: ControllerLaw,
    ) -> Result<(), ShaderError> {
        let params = ControllerParams {
            len: len as u32,
            experts: law.experts as u32,
            target: law.target,
            kp: law.gains.0,
            ki: law.gains.1,
            p_min: law.clamp.0,
            p_max: law.clamp.1,
            per,
        };
        let groups = u32::try_from(controllers)
            .ok()
            .filter(|&c| {
                c <= self
                    .ctx
                    .device
                    .limits()
                    .max_compute_workgroups_per_dimension
            })
            .ok_or_else(|| ShaderError::Unsupported {
                op: "controller_update",
                message: format!("{controllers} controllers in one dispatch"),
            })?;
        self.run(
            &self.controller_update,
            bytemuck::bytes_of(&params),
            &[counts, state],
            (groups, 1),
        );
        Ok(())
    }

    /// Waits until every submitted kernel has finished (for benchmarks).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn synchronize(&self) -> Result<(), ShaderError> {
        self.ctx
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| ShaderError::ReadBack(e.to_string()))
    }
}

/// Whole buffers as bound ranges.
fn whole<'a>(buffers: &[&'a wgpu::Buffer]) -> Vec<Bound<'a>> {
    buffers.iter().map(|&b| b.into()).collect()
}

/// Resolves when a buffer mapping callback has run (works with any executor, and with
/// none on native where the device is polled to completion first).
#[derive(Clone, Default)]
struct MapFuture {
    shared: std::sync::Arc<std::sync::Mutex<MapState>>,
}

#[derive(Default)]
struct MapState {
    result: Option<Result<(), String>>,
    waker: Option<std::task::Waker>,
}

impl MapFuture {
    fn complete(&self, result: Result<(), String>) {
        let mut state = self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.result = Some(result);
        if let Some(w) = state.waker.take() {
            w.wake();
        }
    }
}

impl Future for MapFuture {
    type Output = Result<(), String>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let mut state = self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match state.result.take() {
            Some(r) => std::task::Poll::Ready(r),
            None => {
                state.waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        }
    }
}
