//! dtopp's `.cu` kernels launched through burn-cuda's own cubecl client, on its buffers.
//!
//! Why through cubecl's client, and not dtopp's cudarc launcher on the buffers' pointers:
//! cubecl 0.10 runs each thread's work on its own non-blocking CUDA stream, which it does
//! not expose. A kernel on another stream is ordered against it only by host waits
//! (`ComputeClient::sync` before, a stream sync after): two stalls per launch, the very
//! syncs the grouped layout removes. `ComputeClient::flush` does not help on CUDA (cubecl's
//! launches are already on the stream; flush only releases its drop queue). Launched
//! through the client, a kernel goes on cubecl's stream in program order with burn's own,
//! and cubecl's bindings keep the buffers alive until it has run.
//!
//! The client takes a [`CubeTask`]: [`CudaSource`] hands it the `.cu` module's text
//! (NVRTC compiles it on first use, for the device's own architecture) and the entry
//! point. cubecl-cuda 0.10 unwraps the compiled kernel's IR only to read its shared-memory
//! size (it sets the dynamic shared memory from it), so a kernel with static shared
//! memory passes an empty IR ([`no_ir`]); burn-cubecl's own `SourceKernel` passes none,
//! which cubecl-cuda's compile step panics on. Arguments follow cubecl's convention: the
//! buffers in order, then the metadata block, which on sm_70 and newer is passed by value
//! as the last parameter: the kernels' scalar struct (`dtopp_cuda::params`), with no
//! dynamic part ([`metadata`]).

use std::sync::{Mutex, OnceLock, PoisonError};

use burn::backend::Cuda;
use burn::backend::cuda::CudaDevice;
use burn::tensor::{DType, Int, Tensor, TensorPrimitive};
use burn_cubecl::cubecl::cuda::{CudaCompiler, CudaRuntime};
use burn_cubecl::cubecl::prelude::{
    CompiledKernel, CubePrimitive, KernelId, KernelMetadata, StorageType,
};
use burn_cubecl::cubecl::server::{CubeCount, KernelArguments, MetadataBindingInfo};
use burn_cubecl::cubecl::{CompilationError, Compiler, CubeDim, CubeTask, ExecutionMode};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl_cpp::shared::{Body, ComputeKernel, CubeIndexFlags, Dialect, Elem, Flags, Item};

use crate::error::{Error, Result};

/// The oldest architecture the kernels run on: the tensor-core products use sm_80's
/// `mma.sync` shapes and bf16 conversions, and cubecl passes the scalar struct by value
/// only from sm_70 on.
const MIN_CAPABILITY: (u32, u32) = (8, 0);

/// A `.cu` module's text (`dtopp_cuda::source`, `common.cuh` not yet pasted in), with a
/// hash of it in its kernels' cache key: cubecl can keep compiled PTX on disk between runs
/// (its `compilation.cache` setting), keyed by the kernel id, and a kernel whose text
/// changed must not load the old PTX.
#[derive(Clone, Copy, Debug)]
pub(super) struct CudaModule {
    file: &'static str,
    source: &'static str,
    hash: u64,
}

impl CudaModule {
    /// The module `file` with text `source` (in a `const`, so it is hashed once, at build).
    pub const fn new(file: &'static str, source: &'static str) -> Self {
        // FNV-1a, 64 bits.
        let bytes = source.as_bytes();
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        let mut i = 0;
        while i < bytes.len() {
            hash = (hash ^ bytes[i] as u64).wrapping_mul(0x0100_0000_01b3);
            i += 1;
        }
        Self { file, source, hash }
    }

    /// Its kernel `entry`, run with `threads` threads per block.
    pub fn kernel(self, entry: &'static str, threads: u32) -> CudaSource {
        CudaSource {
            module: self,
            entry,
            threads,
        }
    }
}

/// One entry point of one `.cu` module, run with `threads` threads per block (the
/// kernel's `__launch_bounds__`).
#[derive(Clone, Copy, Debug)]
pub(super) struct CudaSource {
    module: CudaModule,
    entry: &'static str,
    threads: u32,
}

impl CudaSource {
    fn cube_dim(&self) -> CubeDim {
        CubeDim::new_1d(self.threads)
    }
}

impl KernelMetadata for CudaSource {
    fn id(&self) -> KernelId {
        KernelId::new::<Self>()
            .info((self.module.file, self.module.hash, self.entry))
            .cube_dim(self.cube_dim())
    }

    fn address_type(&self) -> StorageType {
        u32::as_type_native_unchecked().storage_type()
    }
}

impl CubeTask<CudaCompiler> for CudaSource {
    fn compile(
        &self,
        _compiler: &mut CudaCompiler,
        _options: &<CudaCompiler as Compiler>::CompilationOptions,
        _mode: ExecutionMode,
        _address_type: StorageType,
    ) -> std::result::Result<CompiledKernel<CudaCompiler>, CompilationError> {
        Ok(CompiledKernel {
            entrypoint_name: self.entry.to_string(),
            debug_name: Some(self.entry),
            source: dtopp_cuda::source::expanded(self.module.source),
            cube_dim: self.cube_dim(),
            debug_info: None,
            repr: Some(no_ir(self.cube_dim())),
        })
    }
}

/// A kernel description with no instructions and no dynamic shared memory: what
/// cubecl-cuda reads of a compiled kernel besides its text.
fn no_ir<D: Dialect>(cube_dim: CubeDim) -> ComputeKernel<D> {
    let address_type = Item::new(Elem::U32, 1, true);
    ComputeKernel {
        tensor_maps: Vec::new(),
        buffers: Vec::new(),
        scalars: Vec::new(),
        info: Default::default(),
        meta_static_len: 0,
        body: Body {
            instructions: Vec::new(),
            shared_memories: Vec::new(),
            pipelines: Vec::new(),
            barriers: Vec::new(),
            const_arrays: Vec::new(),
            local_arrays: Vec::new(),
            info_by_ptr: false,
            has_dynamic_meta: false,
            address_type,
        },
        cube_dim,
        cluster_dim: None,
        extensions: Vec::new(),
        flags: Flags {
            elem_fp4: false,
            elem_fp6: false,
            elem_fp8: false,
            elem_bf16: false,
            elem_f16: false,
            elem_tf32: false,
            indexes: CubeIndexFlags::default(),
            op_barrier: false,
            op_pipeline: false,
            inst_tma: false,
            inst_tma_im2col: false,
            inst_wmma: false,
            inst_ptx_wrappers: false,
            inst_async_copy: false,
            use_grid_constants: true,
            static_meta_length: 0,
            has_dynamic_meta: false,
            has_info: true,
            cube_dim,
            cluster_dim: None,
            address_type,
        },
        items: Default::default(),
        kernel_name: String::new(),
    }
}

/// Queues `kernel` on `grid` blocks on the stream of `buffers`' client, after everything
/// burn queued there before: `buffers` in the kernel's parameter order, then `params` (the
/// kernel's scalar struct). Nothing waits for the device.
pub(super) fn launch<P: bytemuck::Pod>(
    kernel: CudaSource,
    grid: [u32; 3],
    buffers: &[&CubeTensor<CudaRuntime>],
    params: &P,
) {
    let client = &buffers[0].client;
    let bindings = buffers.iter().map(|t| t.handle.clone().binding()).collect();
    let arguments = KernelArguments::new()
        .with_buffers(bindings)
        .with_info(metadata(params));
    client.launch(
        Box::new(kernel),
        CubeCount::Static(grid[0], grid[1], grid[2]),
        arguments,
    );
}

/// `params` as the kernel's metadata block, all of it static. Not
/// `MetadataBindingInfo::custom`, which marks the whole block dynamic: with grid constants
/// cubecl-cuda 0.10 then also uploads it as a buffer and passes that as one more pointer
/// before the struct, where the kernel would read the pointer as its scalars.
fn metadata<P: bytemuck::Pod>(params: &P) -> MetadataBindingInfo {
    let words = dtopp_cuda::params::words(params);
    let end = words.len();
    MetadataBindingInfo::new(words, end)
}

/// Whether dtopp's CUDA kernels run on burn-cuda's buffers: yes, unless the environment
/// says `DTOPP_CUDA_KERNELS=off`. Off, burn-cuda routes with the routing extension's
/// default methods (burn tensor ops), the grouped products read the offsets back and the
/// default layout is padded, as before these launches existed; the log says so ([`super::RoutingBackend::routing_name`]).
/// The switch is there because these launches have not yet run on a GPU (no GPU was lent
/// to the sessions that wrote them): a user whose GPU rejects them can still train.
pub(super) fn kernels_on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| match std::env::var("DTOPP_CUDA_KERNELS") {
        Err(_) => true,
        Ok(given) => parse_switch(&given).unwrap_or_else(|| {
            eprintln!("DTOPP_CUDA_KERNELS={given} ignored: want on or off; using on");
            true
        }),
    })
}

/// `on`/`1` or `off`/`0` (any case), else `None`.
fn parse_switch(given: &str) -> Option<bool> {
    match given.trim().to_ascii_lowercase().as_str() {
        "on" | "1" => Some(true),
        "off" | "0" => Some(false),
        _ => None,
    }
}

/// Whether dtopp's kernels run on `device` (its compute capability, once per device):
/// an error naming the device and what it lacks.
pub(super) fn usable(device: &CudaDevice) -> Result<()> {
    static CHECKED: Mutex<Vec<(usize, std::result::Result<(), String>)>> = Mutex::new(Vec::new());
    let mut checked = CHECKED.lock().unwrap_or_else(PoisonError::into_inner);
    let found = match checked.iter().find(|(i, _)| *i == device.index) {
        Some((_, r)) => r.clone(),
        None => {
            let r = match dtopp_cuda::compute_capability(device.index) {
                Ok(cc) if cc >= MIN_CAPABILITY => Ok(()),
                Ok((major, minor)) => Err(format!(
                    "device {} has compute capability {major}.{minor}; dtopp's CUDA kernels need {}.{} or newer (Ampere)",
                    device.index, MIN_CAPABILITY.0, MIN_CAPABILITY.1
                )),
                Err(e) => Err(e.to_string()),
            };
            checked.push((device.index, r.clone()));
            r
        }
    };
    found.map_err(|message| Error::Backend {
        backend: "cuda",
        message,
    })
}

/// [`usable`] inside a burn op, which cannot return an error: the trainer checks the
/// device before the first step ([`super::RoutingBackend::routing_name`] names it), so
/// a failure here is a broken invariant.
pub(super) fn or_panic(what: &str, device: &CudaDevice) {
    if let Err(e) = usable(device) {
        panic!("dtopp's {what} kernel on burn-cuda: {e}");
    }
}

/// The contiguous cubecl tensor behind a burn float tensor (a copy only when strided);
/// the kernels read f32.
pub(super) fn float<const D: usize>(t: Tensor<Cuda, D>) -> CubeTensor<CudaRuntime> {
    of_dtype(t.into_primitive().tensor(), DType::F32)
}

/// The contiguous cubecl tensor behind a burn int tensor; the kernels read i32.
pub(super) fn int<const D: usize>(t: Tensor<Cuda, D, Int>) -> CubeTensor<CudaRuntime> {
    of_dtype(t.into_primitive(), DType::I32)
}

fn of_dtype(t: CubeTensor<CudaRuntime>, dtype: DType) -> CubeTensor<CudaRuntime> {
    assert_eq!(
        t.dtype, dtype,
        "dtopp's CUDA kernels read {dtype:?} tensors (the model keeps f32 values and i32 indices)"
    );
    burn_cubecl::kernel::into_contiguous(t)
}

/// A new dense row-major tensor for a kernel to fill, on `like`'s client. Not
/// `Tensor::empty`: cubecl-cuda pads the rows of the tensors it allocates itself (pitched
/// memory), and the kernels index rows densely.
pub(super) fn output<const D: usize>(
    like: &CubeTensor<CudaRuntime>,
    shape: [usize; D],
    dtype: DType,
) -> CubeTensor<CudaRuntime> {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        shape.into(),
        dtype,
    )
}

/// A burn float tensor over a cubecl tensor.
pub(super) fn float_tensor<const D: usize>(t: CubeTensor<CudaRuntime>) -> Tensor<Cuda, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// A burn int tensor over a cubecl tensor.
pub(super) fn int_tensor<const D: usize>(t: CubeTensor<CudaRuntime>) -> Tensor<Cuda, D, Int> {
    Tensor::from_primitive(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What cubecl-cuda takes from a compiled kernel (no GPU needed): the entry point, the
    /// module's whole text with `common.cuh` pasted in, the block, and an IR whose shared
    /// memory (cubecl's dynamic shared memory) is zero, as the kernels' is all static.
    #[test]
    fn the_compiled_kernel_is_the_module_text_and_an_empty_ir() {
        const SELECT: CudaModule = CudaModule::new("select.cu", dtopp_cuda::source::SELECT);
        let kernel = SELECT.kernel("top_p", 256);
        let compiled = kernel
            .compile(
                &mut Default::default(),
                &Default::default(),
                ExecutionMode::Checked,
                kernel.address_type(),
            )
            .unwrap();
        assert_eq!(compiled.entrypoint_name, "top_p");
        assert!(
            compiled
                .source
                .contains("extern \"C\" __global__ void top_p(")
        );
        let includes = compiled.source.lines();
        assert!(
            !includes
                .map(str::trim_start)
                .any(|l| l.starts_with("#include"))
        );
        assert_eq!(compiled.cube_dim, CubeDim::new_1d(256));
        assert_eq!(compiled.repr.map(|r| r.shared_memory_size()), Some(0));
        // One cache entry per (module, its text, entry, block).
        let other = SELECT.kernel("top_k", 256);
        let edited = CudaModule::new("select.cu", "// another text").kernel("top_p", 256);
        assert_ne!(kernel.id(), other.id());
        assert_ne!(kernel.id(), edited.id(), "the text is in the key");
        assert_eq!(kernel.id(), SELECT.kernel("top_p", 256).id());
    }

    #[test]
    fn drn_kernels_use_the_spec_epsilon() {
        assert_eq!(dtopp_cuda::params::DRN_EPS, crate::ops::DRN_EPS);
    }

    #[test]
    fn the_kernel_switch_takes_on_and_off() {
        assert_eq!(parse_switch("off"), Some(false));
        assert_eq!(parse_switch(" OFF "), Some(false));
        assert_eq!(parse_switch("0"), Some(false));
        assert_eq!(parse_switch("on"), Some(true));
        assert_eq!(parse_switch("1"), Some(true));
        assert_eq!(parse_switch("no"), None);
    }

    /// The scalars go as the static metadata block (passed by value after the buffers),
    /// with no dynamic part (which cubecl-cuda would pass as an extra buffer first).
    #[test]
    fn the_scalars_are_one_static_metadata_block() {
        let dims = dtopp_cuda::SelectDims {
            tokens: 7,
            experts: 5,
            k: 2,
        };
        let info = metadata(&dims);
        assert_eq!(info.data, dtopp_cuda::params::words(&dims));
        assert_eq!(info.data.len(), 2);
        assert_eq!(info.dynamic_metadata_offset, info.data.len());
    }
}
