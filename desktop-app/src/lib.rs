//! dtopp-desktop: the egui app that trains small DTop-p models live, replays run
//! directories written by `dtopp train` (for example copied or mounted from a training
//! server) and runs the controller simulator, animating the controller's convergence and
//! the routing per token and layer.
//!
//! - [`app`]: the window (source and view tabs, controls, messages);
//! - [`sources`]: live training in a background thread, followed run directories, the
//!   simulator;
//! - [`views`]: controller, layers, tokens, experts, compare;
//! - [`run_data`]: one run as the views see it, whatever its source.
//!
//! Training never runs on the UI thread; bad input (unreadable directories, malformed
//! lines, no GPU adapter) becomes a message in the window, never a crash.

pub mod app;
pub mod fps;
pub mod jsonl_tail;
pub mod run_data;
pub mod settings;
pub mod sources;
pub mod spawn;
pub mod views;

pub use app::{DesktopApp, StartOptions};
