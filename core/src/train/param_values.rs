//! Parameters in visiting order: the ids every rank agrees on, and a checkpoint's values
//! loaded into a model (for training, evaluation or generation alike).

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use super::checkpoint::CheckpointHeader;
use crate::error::{Error, Result};

/// Parameter ids numbered in visiting order: the same on every rank of a data-parallel
/// run, which all-reduces gradients by id (burn's own ids are unique per process).
pub(crate) fn param_id(index: usize) -> ParamId {
    ParamId::from(index as u64)
}

/// Gives every parameter its [`param_id`].
pub(crate) struct NumberParams(pub usize);

impl<B: Backend> ModuleMapper<B> for NumberParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (_, tensor, mapper) = param.consume();
        self.0 += 1;
        Param::from_mapped_value(param_id(self.0 - 1), tensor, mapper)
    }
}

/// `model` with every parameter replaced, in visiting order, by the checkpoint's values
/// (and numbered by [`param_id`]). The ids are returned in the same order. A parameter
/// count or shape that differs from the checkpoint's is an error naming the parameter.
pub(crate) fn load_params<B: Backend, M: Module<B>>(
    model: M,
    header: &CheckpointHeader,
    params: &[Vec<f32>],
) -> Result<(M, Vec<ParamId>)> {
    let mut load = LoadParams {
        values: params.iter(),
        shapes: &header.shapes,
        ids: Vec::new(),
        error: None,
    };
    let model = model.map(&mut load);
    let error = load.error.or_else(|| {
        (load.ids.len() != header.shapes.len() || params.len() != header.shapes.len()).then(|| {
            format!(
                "the checkpoint has {} parameters, the model {}",
                header.shapes.len(),
                load.ids.len()
            )
        })
    });
    match error {
        Some(message) => Err(Error::Parse {
            what: "checkpoint",
            message,
        }),
        None => Ok((model, load.ids)),
    }
}

struct LoadParams<'a> {
    values: std::slice::Iter<'a, Vec<f32>>,
    shapes: &'a [Vec<usize>],
    ids: Vec<ParamId>,
    error: Option<String>,
}

impl<B: Backend> ModuleMapper<B> for LoadParams<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (_, tensor, mapper) = param.consume();
        let index = self.ids.len();
        let id = param_id(index);
        self.ids.push(id);
        let dims = tensor.dims();
        match (self.values.next(), self.shapes.get(index)) {
            (Some(values), Some(shape))
                if shape.as_slice() == dims.as_slice()
                    && values.len() == dims.iter().product::<usize>() =>
            {
                let device = tensor.device();
                // A no-op on a backend without autodiff.
                let loaded =
                    Tensor::<B, D>::from_data(TensorData::new(values.clone(), dims), &device)
                        .require_grad();
                Param::from_mapped_value(id, loaded, mapper)
            }
            (_, shape) => {
                self.error.get_or_insert(format!(
                    "parameter {index} has shape {dims:?} in the model but {shape:?} in the checkpoint"
                ));
                Param::from_mapped_value(id, tensor, mapper)
            }
        }
    }
}
