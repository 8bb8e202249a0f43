//! AdamW with global-norm gradient clipping and decay on matrices only.
//!
//! burn's own AdamW decays every parameter and clips per tensor; pre-training recipes
//! clip the norm of the whole gradient and leave norm gains and the DRN scale theta
//! undecayed (decay would pull theta towards 0, flattening every router). The moments
//! live here, keyed by parameter id, flattened to one dimension.

use std::collections::HashMap;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

use super::adamw_update::{AdamWStep, AdamWUpdateBackend, Scale};
use super::config::OptimizerConfig;

#[derive(Clone)]
struct Moments<B: Backend> {
    first: Tensor<B, 1>,
    second: Tensor<B, 1>,
}

/// An [`AdamW`] state kept to go back to.
pub(crate) struct AdamWSnapshot<B: AutodiffBackend> {
    step: u64,
    moments: HashMap<ParamId, Moments<B::InnerBackend>>,
}

/// The optimizer state.
pub struct AdamW<B: AutodiffBackend> {
    config: OptimizerConfig,
    step: u64,
    moments: HashMap<ParamId, Moments<B::InnerBackend>>,
}

impl<B: AutodiffBackend> std::fmt::Debug for AdamW<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("config", &self.config)
            .field("step", &self.step)
            .field("parameters_with_state", &self.moments.len())
            .finish()
    }
}

impl<B: AutodiffBackend> AdamW<B> {
    /// A fresh optimizer.
    pub fn new(config: OptimizerConfig) -> Self {
        Self {
            config,
            step: 0,
            moments: HashMap::new(),
        }
    }

    /// The state as it is now (tensor handles, no copies), to go back to with
    /// [`AdamW::restore_snapshot`] when a step must run again.
    pub(crate) fn snapshot(&self) -> AdamWSnapshot<B> {
        AdamWSnapshot {
            step: self.step,
            moments: self.moments.clone(),
        }
    }

    /// Back to a [`AdamW::snapshot`].
    pub(crate) fn restore_snapshot(&mut self, snapshot: AdamWSnapshot<B>) {
        self.step = snapshot.step;
        self.moments = snapshot.moments;
    }

    /// Optimizer steps taken.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The `(first, second)` moments of one parameter, flattened (checkpoints).
    pub fn moments_of(&self, id: &ParamId) -> Option<(Vec<f32>, Vec<f32>)> {
        let m = self.moments.get(id)?;
        let read =
            |t: &Tensor<B::InnerBackend, 1>| t.to_data().convert::<f32>().to_vec::<f32>().ok();
        Some((read(&m.first)?, read(&m.second)?))
    }

    /// Restores the step count and the moments of the given parameters (resume).
    pub fn restore(
        &mut self,
        step: u64,
        moments: Vec<(ParamId, Vec<f32>, Vec<f32>)>,
        device: &B::Device,
    ) {
        self.step = step;
        self.moments = moments
            .into_iter()
            .map(|(id, first, second)| {
                let n = first.len();
                let tensor = |v: Vec<f32>| {
                    Tensor::<B::InnerBackend, 1>::from_data(
                        burn::tensor::TensorData::new(v, [n]),
                        device,
                    )
                };
                (
                    id,
                    Moments {
                        first: tensor(first),
                        second: tensor(second),
                    },
                )
            })
            .collect();
    }
}

impl<B: AutodiffBackend<InnerBackend: AdamWUpdateBackend>> AdamW<B> {
    /// One update of `module` with learning rate `lr`. Returns the updated module and the
    /// global gradient norm before clipping (read back: the host decides the clipping).
    pub fn step<M: AutodiffModule<B>>(
        &mut self,
        module: M,
        grads: GradientsParams,
        lr: f64,
    ) -> (M, f64) {
        let total = squared_norm(&module, &grads);
        crate::host_reads::count(u64::from(total.is_some()));
        let grad_norm = total
            .map(|t| f64::from(t.into_scalar().to_f32()).sqrt())
            .unwrap_or(0.0);
        let scale = match self.config.grad_clip {
            Some(clip) if grad_norm > clip => clip / (grad_norm + 1e-6),
            _ => 1.0,
        };
        (
            self.update(module, grads, lr, Scale::Host(scale)),
            grad_norm,
        )
    }

    /// [`AdamW::step`] with nothing read back: the gradient norm and the clipping factor
    /// stay on the device. Returns the updated module and the norm before clipping
    /// (`[1]`, for the step's one read), computed in f32 where [`AdamW::step`] takes the
    /// square root in f64.
    pub fn step_on_device<M: AutodiffModule<B>>(
        &mut self,
        module: M,
        grads: GradientsParams,
        lr: f64,
        device: &B::Device,
    ) -> (M, Tensor<B::InnerBackend, 1>) {
        let norm =
            squared_norm(&module, &grads).map_or_else(|| Tensor::zeros([1], device), Tensor::sqrt);
        let scale = match self.config.grad_clip {
            Some(clip) => {
                let clipped = (norm.clone() + 1e-6).recip() * clip;
                Tensor::ones([1], device).mask_where(norm.clone().greater_elem(clip), clipped)
            }
            None => Tensor::ones([1], device),
        };
        (self.update(module, grads, lr, Scale::Device(scale)), norm)
    }

    fn update<M: AutodiffModule<B>>(
        &mut self,
        module: M,
        mut grads: GradientsParams,
        lr: f64,
        scale: Scale<B::InnerBackend>,
    ) -> M {
        self.step += 1;
        let mut update = Update {
            config: &self.config,
            step: self.step,
            lr,
            scale,
            grads: &mut grads,
            moments: &mut self.moments,
        };
        module.map(&mut update)
    }
}

/// `[1]` the squared global norm of the gradients of `module`'s parameters (`None`
/// when none has one).
fn squared_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> Option<Tensor<B::InnerBackend, 1>> {
    let mut norm = SquaredNorm::<B> { grads, total: None };
    module.visit(&mut norm);
    norm.total
}

trait ToF32 {
    fn to_f32(self) -> f32;
}

impl<E: burn::tensor::ElementConversion> ToF32 for E {
    fn to_f32(self) -> f32 {
        self.elem()
    }
}

struct SquaredNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    total: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let squares = grad.square().sum();
            self.total = Some(match self.total.take() {
                Some(total) => total + squares,
                None => squares,
            });
        }
    }
}

struct Update<'a, B: AutodiffBackend> {
    config: &'a OptimizerConfig,
    step: u64,
    lr: f64,
    scale: Scale<B::InnerBackend>,
    grads: &'a mut GradientsParams,
    moments: &'a mut HashMap<ParamId, Moments<B::InnerBackend>>,
}

impl<B: AutodiffBackend<InnerBackend: AdamWUpdateBackend>> ModuleMapper<B> for Update<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<B::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let c = self.config;
        let dims = tensor.dims();
        let n = dims.iter().product::<usize>();
        let grad = grad.reshape([n]);
        let Moments { first, second } = self.moments.remove(&id).unwrap_or_else(|| Moments {
            first: grad.zeros_like(),
            second: grad.zeros_like(),
        });
        let step = AdamWStep {
            lr: self.lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            step: self.step as i32,
            // Matrices decay; vectors (norm gains, theta) do not.
            decay: (D >= 2 && c.weight_decay > 0.0).then_some(1.0 - self.lr * c.weight_decay),
        };
        let [value, first, second] = B::InnerBackend::adamw_update(
            tensor.inner().reshape([n]),
            grad,
            &self.scale,
            first,
            second,
            step,
        );
        self.moments.insert(id, Moments { first, second });
        let value = Tensor::<B, D>::from_inner(value.reshape(dims)).require_grad();
        Param::from_mapped_value(id, value, mapper)
    }
}
