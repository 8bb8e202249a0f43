//! Pre-training MoE language models with Top-k, fixed Top-p and DTop-p routing (feature
//! `train`): configuration and presets, data batches, losses, AdamW with warmup +
//! cosine schedule and global-norm clipping, the threshold policy, metrics, the loop,
//! checkpoints, data-parallel training over several devices and the safetensors export.

mod adamw;
mod adamw_update;
mod batches;
mod checkpoint;
mod collective;
mod config;
mod data_parallel;
mod device_control;
mod evaluate;
mod export;
mod limit_cycle;
mod loop_limit;
mod losses;
mod memory_estimate;
mod mode;
mod nodes;
mod param_values;
mod schedule;
mod session;
mod supervision;
mod threshold;
mod throughput;
mod trainer;

pub use crate::metrics::{
    ClassBucket, DifficultyBucket, JsonLines, RoutingSample, RunSummary, StepMetrics,
};
pub use adamw::AdamW;
pub use adamw_update::AdamWUpdateBackend;
pub use batches::{Batch, Corpus};
pub use checkpoint::{
    ABORT_IN_CHECKPOINT_ENV, Checkpoint, CheckpointHeader, PolicyState, checkpoint_dir,
    latest_checkpoint, list_checkpoints, write_checkpoint,
};
pub use collective::Rank;
pub use config::{
    DataConfig, LossConfig, OptimizerConfig, Preset, REASONING_SOURCE, RoutingConfig, RunConfig,
    SHARDS_PREFIX, TrainConfig,
};
pub use data_parallel::{resume_data_parallel, resume_node, train_data_parallel, train_node};
pub use device_control::{
    ControllerBackend, DeviceControl, controller_reads, controllers_update_ops,
};
pub(crate) use evaluate::host_f32;
pub use evaluate::{Evaluation, evaluate, printable_byte};
pub use export::{ExportReport, export_safetensors, parameter_names};
pub use losses::{
    LossParts, cross_entropy, load_balance, load_balance_on_device, router_entropy, total_loss,
    total_loss_on_device, z_loss,
};
pub use memory_estimate::{MemoryEstimate, check_fits};
pub use mode::RoutingMode;
pub use nodes::{BINARY_ID_ENV, NodeSpec, binary_id, config_hash};
pub(crate) use param_values::load_params;
pub use schedule::learning_rate;
pub use session::{StepOutput, TrainSession};
pub use supervision::{HEARTBEAT, OrchestrateOptions, SILENCE_LIMIT, orchestrate};
pub use threshold::ThresholdPolicy;
pub use throughput::{
    MemoryProbe, Throughput, ThroughputPlan, measure_throughput, process_peak_rss,
};
pub use trainer::{TrainOptions, read_run_config, resume, train};
