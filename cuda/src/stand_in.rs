//! The CUDA backend's types in a build without the `cuda` feature: the constructor
//! returns [`CudaError::NotBuilt`], so no value of the other types can exist and their
//! methods are unreachable (matching on an empty enum proves it to the compiler).

use crate::GemmPrecision;
use crate::error::CudaError;

#[derive(Clone, Copy, Debug)]
enum Never {}

/// A device buffer (none exist in this build).
#[derive(Clone, Debug)]
pub struct DeviceBuffer(Never);

impl DeviceBuffer {
    /// Values held.
    pub fn len(&self) -> usize {
        match self.0 {}
    }

    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        match self.0 {}
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
    /// `[1]` u32.
    pub status: DeviceBuffer,
}

/// The buffers of a fused DRN + selection.
#[derive(Clone, Debug)]
pub struct RoutedBuffers {
    /// `[N, E]` f32.
    pub probs: DeviceBuffer,
    /// `[1]` u32.
    pub logit_status: DeviceBuffer,
    /// The selection.
    pub selection: SelectionBuffers,
}

/// Largest `E` of the fused kernels (as in the `cuda` build).
pub const FUSED_MAX_EXPERTS: usize = 256;

/// The buffers of a dispatch plan.
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

/// Always false: this build cannot load the driver.
pub fn driver_present() -> bool {
    false
}

/// Always false: this build cannot load NVRTC.
pub fn nvrtc_present() -> bool {
    false
}

/// Always [`CudaError::NotBuilt`].
pub fn device_memory(_ordinal: usize) -> Result<(u64, u64), CudaError> {
    Err(CudaError::NotBuilt)
}

/// Always [`CudaError::NotBuilt`].
pub fn compute_capability(_ordinal: usize) -> Result<(u32, u32), CudaError> {
    Err(CudaError::NotBuilt)
}

/// The kernels (never constructed in this build).
#[derive(Debug)]
pub struct CudaKernels(Never);

impl CudaKernels {
    /// Always [`CudaError::NotBuilt`].
    pub fn new(_ordinal: usize) -> Result<Self, CudaError> {
        Err(CudaError::NotBuilt)
    }

    /// Unreachable.
    pub fn device_name(&self) -> String {
        match self.0 {}
    }

    /// Unreachable.
    pub fn memory_in_use(&self) -> Result<u64, CudaError> {
        match self.0 {}
    }

    /// Unreachable.
    pub fn upload<T: bytemuck::Pod>(
        &self,
        _what: &str,
        _data: &[T],
    ) -> Result<DeviceBuffer, CudaError> {
        match self.0 {}
    }

    /// Unreachable.
    pub fn zeros(&self, _what: &str, _len: usize) -> Result<DeviceBuffer, CudaError> {
        match self.0 {}
    }

    /// Unreachable.
    pub fn read<T: bytemuck::Pod>(
        &self,
        _buffer: &DeviceBuffer,
        _len: usize,
    ) -> Result<Vec<T>, CudaError> {
        match self.0 {}
    }

    /// Unreachable.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        match self.0 {}
    }

    /// Unreachable.
    pub fn drn_forward(
        &self,
        _logits: &DeviceBuffer,
        _tokens: usize,
        _experts: usize,
        _theta: Option<f32>,
    ) -> Result<(DeviceBuffer, DeviceBuffer), CudaError> {
        match self.0 {}
    }

    /// Unreachable.
    pub fn drn_backward(
        &self,
        _logits: &DeviceBuffer,
        _probs: &DeviceBuffer,
        _grad_probs: &DeviceBuffer,
        _tokens: usize,
        _experts: usize,
        _theta: Option<f32>,
    ) -> Result<(DeviceBuffer, DeviceBuffer, DeviceBuffer), CudaError> {
        match self.0 {}
    }

    /// Unreachable.
    pub fn top_p(
        &self,
        _probs: &DeviceBuffer,
        _tokens: usize,
        _experts: usize,
        _threshold: &DeviceBuffer,
        _k_max: Option<usize>,
    ) -> Result<SelectionBuffers, CudaError> {
        match self.0 {}
    }

    /// Unreachable.
    pub fn drn_select(
        &self,
        _logits: &DeviceBuffer,
        _tokens: usize,
        _experts: usize,
        _theta: Option<f32>,
        _threshold: Option<&DeviceBuffer>,
        _limit: usize,
    ) -> Result<RoutedBuffers, CudaError> {
        match self.0 {}
    }

    /// Unreachable.
    pub fn top_k(
        &self,
        _probs: &DeviceBuffer,
        _tokens: usize,
        _experts: usize,
        _k: usize,
    ) -> Result<SelectionBuffers, CudaError> {
        match self.0 {}
    }

    /// Unreachable.
    pub fn dispatch_plan(
        &self,
        _experts_sel: &DeviceBuffer,
        _weights_sel: &DeviceBuffer,
        _counts_sel: &DeviceBuffer,
        _tokens: usize,
        _experts: usize,
        _capacity: usize,
    ) -> Result<DispatchBuffers, CudaError> {
        match self.0 {}
    }

    /// Unreachable.
    pub fn gather(
        &self,
        _x: &DeviceBuffer,
        _hidden: usize,
        _plan: &DispatchBuffers,
        _rows: usize,
        _experts: usize,
    ) -> Result<DeviceBuffer, CudaError> {
        match self.0 {}
    }

    /// Unreachable.
    pub fn combine(
        &self,
        _y: &DeviceBuffer,
        _hidden: usize,
        _plan: &DispatchBuffers,
        _rows: usize,
        _experts: usize,
    ) -> Result<DeviceBuffer, CudaError> {
        match self.0 {}
    }

    /// Unreachable.
    #[allow(clippy::too_many_arguments)]
    pub fn controller_update(
        &self,
        _state: &DeviceBuffer,
        _counts: &DeviceBuffer,
        _len: usize,
        _experts: usize,
        _target: f32,
        _gains: (f32, f32),
        _clamps: (f32, f32),
    ) -> Result<(), CudaError> {
        match self.0 {}
    }

    /// Unreachable.
    pub fn grouped_matmul(
        &self,
        _x: &DeviceBuffer,
        _w: &DeviceBuffer,
        _offsets: &DeviceBuffer,
        _dims: [usize; 4],
        _transposed: bool,
        _precision: GemmPrecision,
    ) -> Result<DeviceBuffer, CudaError> {
        match self.0 {}
    }

    /// Unreachable.
    pub fn grouped_weight_grad(
        &self,
        _x: &DeviceBuffer,
        _g: &DeviceBuffer,
        _offsets: &DeviceBuffer,
        _dims: [usize; 4],
    ) -> Result<DeviceBuffer, CudaError> {
        match self.0 {}
    }
}
