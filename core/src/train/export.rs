//! `dtopp export`: a run's newest intact checkpoint as a safetensors file of the weights
//! and a JSON file of everything needed to use them (model shape, routing settings, the
//! controller's threshold at export time, every tensor's name and shape).
//!
//! Tensor names are the module paths of [`MoeLanguageModel`] (`embed`,
//! `blocks.3.moe.experts_up`, ...), taken by visiting a model of the same structure; see
//! `docs/export.md` for the full list and layouts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use serde::Serialize;

use super::checkpoint::{PolicyState, latest_checkpoint};
use super::config::RoutingConfig;
use crate::error::{Error, Result};
use crate::io::{SafeTensor, encode_safetensors, write_atomic};
use crate::model::{ModelConfig, MoeLanguageModel};

/// What [`export_safetensors`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportReport {
    /// The checkpoint exported.
    pub checkpoint: PathBuf,
    /// Its step.
    pub step: u64,
    /// Damaged newer checkpoints that were skipped, with the reason.
    pub skipped: Vec<String>,
    /// The weights file.
    pub weights: PathBuf,
    /// The JSON config beside it.
    pub config: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Parameters written.
    pub parameters: u64,
}

/// The JSON written beside the weights.
#[derive(Debug, Serialize)]
struct ExportConfig<'a> {
    format: &'static str,
    dtopp_version: &'static str,
    step: u64,
    model: &'a ModelConfig,
    routing: &'a RoutingConfig,
    /// The threshold policy's state at this step (controller `p`, integral), which
    /// inference with DTop-p routing continues from.
    policy: &'a PolicyState,
    layout: &'static str,
    tensors: Vec<TensorEntry<'a>>,
}

#[derive(Debug, Serialize)]
struct TensorEntry<'a> {
    name: &'a str,
    shape: &'a [usize],
}

const LAYOUT: &str = "f32, row-major; matrices are [in, out] (y = x @ W, transpose for \
torch.nn.Linear.weight); expert weights are stacked [E, in, out]; see docs/export.md";

/// Writes the newest intact checkpoint of the run in `run` to `weights` (safetensors)
/// and its config to the same path with extension `.json`, both atomically.
pub fn export_safetensors(run: &Path, weights: &Path) -> Result<ExportReport> {
    let config_path = weights.with_extension("json");
    if config_path == weights {
        return Err(Error::param(
            "--safetensors",
            weights.display(),
            "a file name whose extension is not .json (the config is written beside it as NAME.json)",
        ));
    }
    let (checkpoint, path, skipped) = latest_checkpoint(run)?;
    let header = &checkpoint.header;
    let names = parameter_names(&header.model)?;
    if names.len() != checkpoint.params.len() || names.len() != header.shapes.len() {
        return Err(Error::Parse {
            what: "checkpoint",
            message: format!(
                "{} holds {} parameters, but a model of its config has {}",
                path.display(),
                checkpoint.params.len(),
                names.len()
            ),
        });
    }
    for ((name, rank), shape) in names.iter().zip(&header.shapes) {
        if *rank != shape.len() {
            return Err(Error::Parse {
                what: "checkpoint",
                message: format!(
                    "{}: parameter {name} has shape {shape:?}, expected rank {rank}",
                    path.display()
                ),
            });
        }
    }
    let tensors: Vec<SafeTensor<'_>> = names
        .iter()
        .zip(&header.shapes)
        .zip(&checkpoint.params)
        .map(|(((name, _), shape), data)| SafeTensor { name, shape, data })
        .collect();
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("dtopp_step".to_string(), header.step.to_string());
    metadata.insert("layout".to_string(), LAYOUT.to_string());
    let bytes = encode_safetensors(&tensors, &metadata)?;
    let config = ExportConfig {
        format: "dtopp-export-1",
        dtopp_version: env!("CARGO_PKG_VERSION"),
        step: header.step,
        model: &header.model,
        routing: &header.routing,
        policy: &header.policy,
        layout: LAYOUT,
        tensors: tensors
            .iter()
            .map(|t| TensorEntry {
                name: t.name,
                shape: t.shape,
            })
            .collect(),
    };
    let json = serde_json::to_vec_pretty(&config).map_err(|e| Error::Parse {
        what: "export config",
        message: e.to_string(),
    })?;
    if let Some(parent) = weights.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io("cannot create the export directory", parent, e))?;
    }
    write_atomic(weights, &bytes)?;
    write_atomic(&config_path, &json)?;
    Ok(ExportReport {
        checkpoint: path,
        step: header.step,
        skipped,
        weights: weights.to_path_buf(),
        config: config_path,
        tensors: tensors.len(),
        parameters: checkpoint.params.iter().map(|p| p.len() as u64).sum(),
    })
}

/// Every parameter's name (module path) and rank, in the order checkpoints store them.
///
/// Names depend on the model's structure (blocks, which are MoE), not its sizes, so they
/// are read off a model with the same structure and minimal widths: exporting a 7B
/// checkpoint does not build a 7B model.
pub fn parameter_names(config: &ModelConfig) -> Result<Vec<(String, usize)>> {
    let structure = ModelConfig {
        vocab: 2,
        d_model: 2 * config.heads,
        seq_len: 2,
        expert_hidden: 1,
        dense_hidden: 1,
        ..config.clone()
    };
    let model = MoeLanguageModel::<NdArray>::new(&structure, 0, &Default::default())?;
    let mut names = ParamNames::default();
    model.visit(&mut names);
    Ok(names.names)
}

#[derive(Default)]
struct ParamNames {
    path: Vec<String>,
    names: Vec<(String, usize)>,
}

impl ModuleVisitor<NdArray> for ParamNames {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, _param: &Param<Tensor<NdArray, D>>) {
        self.names.push((self.path.join("."), D));
    }
}
