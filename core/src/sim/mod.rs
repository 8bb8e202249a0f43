//! The closed-loop simulator: the controller on synthetic router logits, no model.

mod closed_loop;
mod config;
mod run;
mod stream;
mod summary;

pub use closed_loop::{ClosedLoop, SelectionRule, launch_selection, mean_count};
pub use config::{SimConfig, SimMode, SimOutcome, StepRecord};
pub use run::{Simulation, run_simulation};
pub use stream::StreamConfig;
pub use summary::{SETTLE_BAND, SETTLE_WINDOW, TrackingSummary, mean_std};
