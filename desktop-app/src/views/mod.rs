//! The views. Each draws the runs of the current source and owns no data, except
//! Inference, which runs a trained run's model (its own worker) and needs no source.
//! Views show the revealed prefix of each run (`visible`), so one animation cursor
//! replays a finished run as if it were arriving.

pub mod compare;
pub mod controller;
pub mod experts;
#[cfg(feature = "live")]
pub mod inference;
pub mod layers;
pub mod tokens;

mod palette;

use serde::{Deserialize, Serialize};

pub use palette::{count_color, mode_color, series_color};

/// Which view the central panel shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum View {
    /// p_t, a_t against T, error and integral.
    #[default]
    Controller,
    /// Theta, mean k and the k histogram per layer.
    Layers,
    /// A text sample coloured by experts per token; token x layer heatmap.
    Tokens,
    /// Load per expert per layer.
    Experts,
    /// Several runs overlaid.
    Compare,
    /// A trained run's model generating text at a chosen compute.
    Inference,
}

impl View {
    /// All views, in tab order.
    pub const ALL: [View; 6] = [
        View::Controller,
        View::Layers,
        View::Tokens,
        View::Experts,
        View::Compare,
        View::Inference,
    ];

    /// Whether this build has the view (Inference needs the model: feature `live`).
    pub fn available(self) -> bool {
        self != View::Inference || cfg!(feature = "live")
    }

    /// Tab label.
    pub fn label(self) -> &'static str {
        match self {
            View::Controller => "Controller",
            View::Layers => "Layers",
            View::Tokens => "Tokens",
            View::Experts => "Experts",
            View::Compare => "Compare",
            View::Inference => "Inference",
        }
    }
}

/// How the tokens view colours a token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenLayer {
    /// Mean experts over all MoE layers.
    #[default]
    Average,
    /// Experts in one MoE layer.
    Layer(usize),
}

/// Recent steps over which per-step counts (loads, k histograms) are summed: one step
/// of a small batch is noisy.
pub const RECENT_STEPS: usize = 10;
