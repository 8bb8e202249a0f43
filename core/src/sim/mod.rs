//! The closed-loop simulator: the controller on synthetic router logits, no model.

mod closed_loop;
mod run;
mod stream;
mod summary;

pub use closed_loop::{ClosedLoop, SelectionRule, launch_selection, mean_count};
pub use run::{SimConfig, SimMode, SimOutcome, Simulation, StepRecord, run_simulation};
pub use stream::StreamConfig;
pub use summary::{SETTLE_BAND, SETTLE_WINDOW, TrackingSummary, mean_std};
