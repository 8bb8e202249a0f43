//! One run as the views see it, whatever it came from: the step records of a training
//! run (`dtopp train`, live or replayed) or of a controller simulation (`dtopp
//! simulate`, or the built-in simulator), and the routing samples of training runs.

use dtopp::metrics::{RoutingSample, StepMetrics};
use dtopp::sim::{StepRecord, TrackingSummary};

/// One step, with the fields every source has and the training-only ones optional.
#[derive(Clone, Debug, PartialEq)]
pub struct StepPoint {
    /// Step number as the source counts it.
    pub step: u64,
    /// `T` in force.
    pub target: f64,
    /// Threshold `p_t` routed with (mean over layers); `None` for Top-k.
    pub threshold: Option<f64>,
    /// Controller integral after the step; `None` without a controller.
    pub integral: Option<f64>,
    /// Normalised error `(T - a_t) / E`; `None` without a controller.
    pub error: Option<f64>,
    /// `a_t`.
    pub active: f64,
    /// `a_t` per MoE layer.
    pub active_per_layer: Vec<f64>,
    /// DRN scale theta per layer (training runs).
    pub theta_per_layer: Vec<f64>,
    /// Per layer, `hist[k - 1]` = tokens that activated `k` experts (training runs).
    pub k_histogram_per_layer: Vec<Vec<u64>>,
    /// Per layer, routes to each expert (training runs).
    pub expert_load_per_layer: Vec<Vec<u64>>,
    /// Training cross-entropy (training runs).
    pub ce_loss: Option<f64>,
    /// Validation loss on the steps that measured it.
    pub val_loss: Option<f64>,
    /// Training tokens per second (training runs).
    pub tokens_per_sec: Option<f64>,
}

impl StepPoint {
    /// A training step. Its error is computed here: `metrics.jsonl` does not store it.
    pub fn from_training(m: &StepMetrics) -> Self {
        let experts = m.expert_load_per_layer.first().map(Vec::len).unwrap_or(0);
        let error = m
            .integral
            .filter(|_| experts > 0)
            .map(|_| (m.target - m.active_experts) / experts as f64);
        Self {
            step: m.step,
            target: m.target,
            threshold: m.threshold,
            integral: m.integral,
            error,
            active: m.active_experts,
            active_per_layer: m.active_experts_per_layer.clone(),
            theta_per_layer: m.theta_per_layer.clone(),
            k_histogram_per_layer: m.k_histogram_per_layer.clone(),
            expert_load_per_layer: m.expert_load_per_layer.clone(),
            ce_loss: Some(m.ce_loss),
            val_loss: m.val_loss,
            tokens_per_sec: Some(m.tokens_per_sec),
        }
    }

    /// A simulator step.
    pub fn from_simulation(r: &StepRecord) -> Self {
        Self {
            step: r.step,
            target: r.target,
            threshold: r.threshold,
            integral: r.integral,
            error: r.error,
            active: r.active_experts,
            active_per_layer: r.active_experts_per_layer.clone(),
            theta_per_layer: Vec::new(),
            k_histogram_per_layer: Vec::new(),
            expert_load_per_layer: Vec::new(),
            ce_loss: None,
            val_loss: None,
            tokens_per_sec: None,
        }
    }

    /// Parses one line of a `metrics.jsonl`: a training step, else a simulator step;
    /// returns the step and the routing mode the line names.
    pub fn parse_line(line: &str) -> Result<(Self, String), String> {
        match serde_json::from_str::<StepMetrics>(line) {
            Ok(m) => Ok((Self::from_training(&m), m.mode)),
            Err(training) => match serde_json::from_str::<StepRecord>(line) {
                Ok(r) => Ok((Self::from_simulation(&r), r.mode)),
                Err(_) => Err(training.to_string()),
            },
        }
    }
}

/// Everything known about one run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunData {
    /// What the views call it (directory name, mode).
    pub label: String,
    /// Routing mode, as the run names it.
    pub mode: String,
    /// The steps so far, in order.
    pub steps: Vec<StepPoint>,
    /// Routing samples so far, in order.
    pub samples: Vec<RoutingSample>,
}

impl RunData {
    /// An empty run.
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            ..Self::default()
        }
    }

    /// Appends a step (and takes the mode from the first one that names it).
    pub fn push_training(&mut self, m: &StepMetrics) {
        if self.mode.is_empty() {
            self.mode.clone_from(&m.mode);
        }
        self.steps.push(StepPoint::from_training(m));
    }

    /// Appends a simulator step.
    pub fn push_simulation(&mut self, r: &StepRecord) {
        if self.mode.is_empty() {
            self.mode.clone_from(&r.mode);
        }
        self.steps.push(StepPoint::from_simulation(r));
    }

    /// MoE layers, from the steps seen.
    pub fn layers(&self) -> usize {
        self.steps
            .last()
            .map_or(0, |s| s.active_per_layer.len().max(s.theta_per_layer.len()))
    }

    /// Experts per layer, where the run records loads (training runs).
    pub fn experts(&self) -> Option<usize> {
        self.steps
            .last()
            .and_then(|s| s.expert_load_per_layer.first())
            .map(Vec::len)
    }

    /// The first `visible` steps (all when `None`): what an animation has revealed.
    pub fn visible_steps(&self, visible: Option<usize>) -> &[StepPoint] {
        &self.steps[..visible.unwrap_or(self.steps.len()).min(self.steps.len())]
    }

    /// Settling and tracking of `a_t` over `steps` (the trainer's and simulator's rule).
    pub fn tracking(steps: &[StepPoint]) -> Option<TrackingSummary> {
        if steps.is_empty() {
            return None;
        }
        let active: Vec<f64> = steps.iter().map(|s| s.active).collect();
        let targets: Vec<f64> = steps.iter().map(|s| s.target).collect();
        Some(TrackingSummary::of(&active, &targets))
    }

    /// Mean `a_t` of each layer over the last `window` steps of `steps`.
    pub fn mean_k_per_layer(steps: &[StepPoint], window: usize) -> Vec<f64> {
        let tail = &steps[steps.len().saturating_sub(window.max(1))..];
        let layers = tail.last().map_or(0, |s| s.active_per_layer.len());
        (0..layers)
            .map(|l| tail.iter().map(|s| s.active_per_layer[l]).sum::<f64>() / tail.len() as f64)
            .collect()
    }

    /// The routing sample to show for a revealed prefix of steps: the last one taken at
    /// or before the last revealed step.
    pub fn sample_at(&self, steps: &[StepPoint]) -> Option<&RoutingSample> {
        let last = steps.last().map_or(0, |s| s.step);
        self.samples
            .iter()
            .rev()
            .find(|s| s.step <= last)
            .or(self.samples.first())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_simulator_and_training_lines_and_names_bad_ones() {
        let sim = r#"{"step":0,"mode":"dtopp","target":8.0,"threshold":0.5,"active_experts":7.5,"active_experts_per_layer":[7.0,8.0],"integral":0.01,"error":0.0078}"#;
        let (p, mode) = StepPoint::parse_line(sim).unwrap();
        assert_eq!(mode, "dtopp");
        assert_eq!(p.active_per_layer, vec![7.0, 8.0]);
        assert_eq!(p.error, Some(0.0078));
        assert!(StepPoint::parse_line("{\"step\": 1").is_err());
        assert!(StepPoint::parse_line("not json").is_err());
    }

    #[test]
    fn mean_k_uses_the_last_window() {
        let mut run = RunData::new("r");
        for (i, a) in [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]].iter().enumerate() {
            run.steps.push(StepPoint {
                step: i as u64,
                target: 4.0,
                threshold: None,
                integral: None,
                error: None,
                active: (a[0] + a[1]) / 2.0,
                active_per_layer: a.to_vec(),
                theta_per_layer: vec![],
                k_histogram_per_layer: vec![],
                expert_load_per_layer: vec![],
                ce_loss: None,
                val_loss: None,
                tokens_per_sec: None,
            });
        }
        assert_eq!(RunData::mean_k_per_layer(&run.steps, 2), vec![4.0, 5.0]);
        assert_eq!(run.visible_steps(Some(1)).len(), 1);
        assert_eq!(run.visible_steps(Some(10)).len(), 3);
    }
}
