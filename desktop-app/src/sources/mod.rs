//! Where runs come from: a live training thread, followed run directories, or the
//! controller simulator.

#[cfg(feature = "live")]
pub mod inference;
#[cfg(feature = "live")]
pub mod live;
pub mod replay;
pub mod simulator;

use serde::{Deserialize, Serialize};

/// The source the app shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SourceKind {
    /// Train a small model here.
    Live,
    /// Follow run directories written by `dtopp train` / `dtopp simulate`.
    #[default]
    Replay,
    /// The controller on synthetic logits.
    Simulator,
}

impl SourceKind {
    /// Every source this build offers, in tab order.
    pub fn all() -> Vec<SourceKind> {
        let mut all = Vec::new();
        if cfg!(feature = "live") {
            all.push(SourceKind::Live);
        }
        // A browser page has no run directories to follow.
        if !cfg!(target_arch = "wasm32") {
            all.push(SourceKind::Replay);
        }
        all.push(SourceKind::Simulator);
        all
    }

    /// The source shown when the remembered one is not in this build.
    pub fn fallback() -> SourceKind {
        if cfg!(target_arch = "wasm32") {
            SourceKind::Simulator
        } else {
            SourceKind::Replay
        }
    }

    /// Tab label.
    pub fn label(self) -> &'static str {
        match self {
            SourceKind::Live => "Live",
            SourceKind::Replay => "Replay",
            SourceKind::Simulator => "Simulator",
        }
    }
}
