//! What the app remembers between sessions (eframe storage); runtime state such as
//! loaded runs and the training thread lives in the app, not here.

use serde::{Deserialize, Serialize};

use crate::sources::SourceKind;
#[cfg(feature = "live")]
use crate::sources::live::LiveSettings;
use crate::sources::simulator::SimSettings;
use crate::views::{TokenLayer, View};

/// Persisted settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Source shown.
    pub source: SourceKind,
    /// View shown.
    pub view: View,
    /// Live training settings.
    #[cfg(feature = "live")]
    pub live: LiveSettings,
    /// Simulator settings.
    pub sim: SimSettings,
    /// Run directories opened last time (reopened at start).
    pub replay_dirs: Vec<String>,
    /// Layer whose k histogram the layers view shows.
    pub histogram_layer: usize,
    /// How the tokens view colours tokens.
    pub token_layer: TokenLayer,
    /// Replay animation speed, steps per second.
    pub playback_speed: f64,
    /// Leave the frame rate out of the status bar (snapshot tests: it varies by frame).
    pub hide_frame_rate: bool,
}

/// The storage key.
pub const STORAGE_KEY: &str = "dtopp-desktop-settings";
