//! The routing modes a run can train with: the method, its baselines and its ablations.

use serde::{Deserialize, Serialize};

/// How MoE layers select experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum RoutingMode {
    /// Softmax router, the `T` most probable experts (T must be a whole number).
    Topk,
    /// Softmax router, Top-p at a fixed threshold (calibrated to T at initialisation
    /// unless given).
    Topp,
    /// DTop-p: DRN router, Top-p with the PI controller moving the threshold.
    Dtopp,
    /// Ablation: softmax router (no DRN), Top-p with the PI controller.
    DtoppNoDrn,
    /// Ablation: DRN router, Top-p at a fixed threshold (no PI controller).
    DrnOnly,
}

impl RoutingMode {
    /// Every mode, in the order reports list them.
    pub const ALL: [RoutingMode; 5] = [
        RoutingMode::Topk,
        RoutingMode::Topp,
        RoutingMode::Dtopp,
        RoutingMode::DtoppNoDrn,
        RoutingMode::DrnOnly,
    ];

    /// The name used in configs, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            RoutingMode::Topk => "topk",
            RoutingMode::Topp => "topp",
            RoutingMode::Dtopp => "dtopp",
            RoutingMode::DtoppNoDrn => "dtopp-no-drn",
            RoutingMode::DrnOnly => "drn-only",
        }
    }

    /// Whether the router normalizes with DRN (otherwise plain softmax).
    pub fn uses_drn(self) -> bool {
        matches!(self, RoutingMode::Dtopp | RoutingMode::DrnOnly)
    }

    /// Whether the PI controller moves the threshold.
    pub fn uses_controller(self) -> bool {
        matches!(self, RoutingMode::Dtopp | RoutingMode::DtoppNoDrn)
    }

    /// Whether selection is Top-p (every mode but `topk`).
    pub fn uses_threshold(self) -> bool {
        self != RoutingMode::Topk
    }
}

impl std::fmt::Display for RoutingMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
