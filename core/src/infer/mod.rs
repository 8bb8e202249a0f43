//! Using a trained model (feature `train`): a run's newest checkpoint loaded for
//! inference, its compute chosen at inference time (a target `T'` or a threshold), the
//! validation loss across compute settings (`dtopp eval`) and sampling with a KV cache
//! (`dtopp generate`).

mod compute;
mod generate;
mod run;
mod sweep;

pub use compute::{CALIBRATION_BATCHES, Calibrated, Compute, calibrate};
pub use generate::{GenerateOptions, Generation, RoutedToken, generate};
pub use run::TrainedRun;
pub use sweep::{EvalPoint, EvalReport, SweepRequest, evaluate_sweep};
