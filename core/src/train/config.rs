//! The run configuration: every setting of a training run, its presets, TOML overlay and
//! validation. A config file only needs the fields it changes: it is laid over the
//! preset, and unknown fields are errors (a typo never silently does nothing).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::mode::RoutingMode;
use crate::controller::{
    ControllerConfig, DEFAULT_KI, DEFAULT_KP, DEFAULT_P_MAX, DEFAULT_P_MIN, ThresholdScope,
};
use crate::data::{ReasoningConfig, SyntheticConfig};
use crate::error::{Error, Result};
use crate::model::{ModelConfig, Precision};

/// Everything a run needs, as written to `config.toml` in the run directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Steps, batch, seed, logging and evaluation cadence.
    pub run: RunConfig,
    /// Model shape.
    pub model: ModelConfig,
    /// Expert selection and the threshold controller.
    pub routing: RoutingConfig,
    /// AdamW, schedule and clipping.
    pub optimizer: OptimizerConfig,
    /// Auxiliary loss coefficients.
    pub loss: LossConfig,
    /// Training corpus.
    pub data: DataConfig,
}

/// Steps, batch, seed and cadence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Optimizer steps.
    pub steps: u64,
    /// Sequences per micro-batch on each device.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    pub grad_accum: usize,
    /// Seed of the weights and the data order.
    pub seed: u64,
    /// Validation loss every this many steps (and at the last step); 0: only at the end.
    pub eval_every: u64,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    /// Routing sample of the validation snippet every this many steps; 0: never.
    pub sample_every: u64,
    /// Progress line every this many steps.
    pub log_every: u64,
    /// A checkpoint every this many steps and at the end; 0: none.
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Checkpoints kept (the newest).
    #[serde(default = "default_keep_checkpoints")]
    pub keep_checkpoints: usize,
    /// Data-parallel ranks (devices): each takes `batch_size` sequences of every
    /// micro-batch, so the global batch is `devices * batch_size * grad_accum`. Set by
    /// `dtopp train --devices`; a resumed run needs the same count.
    #[serde(default = "default_devices")]
    pub devices: usize,
    /// Nodes (processes) the `devices` ranks are spread over, the same number on each
    /// (`dtopp train --nodes`); a resumed run needs the same count. Written only when
    /// above 1.
    #[serde(default = "default_devices", skip_serializing_if = "is_one")]
    pub nodes: usize,
    /// The dtype of the model's large matrix products in training steps (parameters,
    /// optimizer state, router, norms, softmaxes and losses stay f32; validation, routing
    /// samples and the `p_0` calibration run in f32). `bf16` needs CUDA, `f16` a GPU with
    /// 16-bit float shaders; the backend is checked before the run starts.
    #[serde(default)]
    pub precision: Precision,
}

fn default_keep_checkpoints() -> usize {
    3
}

fn default_devices() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

/// Expert selection and the threshold controller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// The routing mode.
    pub mode: RoutingMode,
    /// `T`, the target mean number of activated experts per token (`k` of Top-k).
    pub target: f64,
    /// Cap on experts per token in Top-p modes.
    pub k_max: Option<usize>,
    /// Fixed `p` (topp, drn-only) or `p_0` (dtopp modes); unset: calibrated so the first
    /// batch activates about `T` experts per token.
    pub threshold: Option<f64>,
    /// Proportional gain `Kp`.
    pub kp: f64,
    /// Integral gain `Ki`.
    pub ki: f64,
    /// Lower clamp of `p`.
    pub p_min: f64,
    /// Upper clamp of `p`.
    pub p_max: f64,
    /// One global threshold (the method) or one per layer.
    pub scope: ThresholdScope,
}

/// AdamW with warmup + cosine schedule and global-norm clipping.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the last step.
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Decoupled weight decay, applied to matrices only (not to norms or theta).
    pub weight_decay: f64,
    /// Adam beta_1.
    pub beta1: f64,
    /// Adam beta_2.
    pub beta2: f64,
    /// Adam epsilon.
    pub eps: f64,
    /// Clip the global gradient norm to this; unset: no clipping.
    pub grad_clip: Option<f64>,
}

/// Coefficients of the auxiliary losses (DESIGN.md section 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// Switch-style load-balancing loss.
    pub balance: f64,
    /// Router entropy (mean over tokens of `-sum_j P log P`; mildly sharpens routing).
    pub entropy: f64,
    /// Router z-loss (`mean logsumexp(z)^2`); off by default, it fights the threshold.
    pub z_loss: f64,
}

/// The training corpus.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `"synthetic"` (the built-in language), `"synthetic:reasoning"` (the built-in
    /// language of copy, recall and composed lookups), `"shards:GLOB"` (llm.c / nanoGPT token
    /// shards, e.g. `"shards:data/fineweb_train_*.bin"`), or the path of a UTF-8 text
    /// file (byte-level tokens, vocabulary 256).
    pub source: String,
    /// Validation shards (`"shards:GLOB"`); without it the last `val_fraction` of the
    /// last training shard is held out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<String>,
    /// Fraction of a text file (or of the last shard) kept for validation (its tail).
    pub val_fraction: f64,
    /// The synthetic language (used when `source = "synthetic"`).
    pub synthetic: SyntheticConfig,
    /// The reasoning language (used when `source = "synthetic:reasoning"`).
    #[serde(default)]
    pub reasoning: ReasoningConfig,
}

/// The named starting points of `--preset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Preset {
    /// Two MoE blocks, 16 experts, T = 4: minutes on a 2-core CPU.
    Tiny,
    /// About 100M parameters, 64 experts, T = 8: for a GPU.
    Small,
    /// The paper's MoE-1.3B-6.9B-64E8A shape (1.3B active of 6.9B parameters, 64
    /// experts, T = 8, sequence 2048, GPT-NeoX vocabulary); see `paper_13b` for what the
    /// paper does not state and how it was filled in.
    #[cfg_attr(feature = "cli", value(name = "paper-1.3b-64e8a"))]
    Paper13b64e8a,
}

impl Preset {
    /// The preset's full config.
    pub fn config(self) -> TrainConfig {
        match self {
            Preset::Tiny => tiny(),
            Preset::Small => small(),
            Preset::Paper13b64e8a => paper_13b(),
        }
    }
}

fn tiny() -> TrainConfig {
    TrainConfig {
        run: RunConfig {
            steps: 300,
            batch_size: 16,
            grad_accum: 1,
            seed: 0,
            eval_every: 50,
            eval_batches: 4,
            sample_every: 50,
            log_every: 1,
            checkpoint_every: 0,
            keep_checkpoints: 3,
            devices: 1,
            nodes: 1,
            precision: Precision::F32,
        },
        model: ModelConfig {
            vocab: 256,
            d_model: 64,
            layers: 2,
            heads: 4,
            seq_len: 64,
            experts: 16,
            expert_hidden: 64,
            moe_every: 1,
            dense_hidden: 128,
            rope_theta: 10_000.0,
            init_std: 0.02,
        },
        routing: RoutingConfig {
            mode: RoutingMode::Dtopp,
            target: 4.0,
            k_max: None,
            threshold: None,
            kp: DEFAULT_KP,
            ki: DEFAULT_KI,
            p_min: DEFAULT_P_MIN,
            p_max: DEFAULT_P_MAX,
            scope: ThresholdScope::Global,
        },
        optimizer: OptimizerConfig {
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 20,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: Some(1.0),
        },
        loss: LossConfig {
            balance: 1e-4,
            entropy: 1e-3,
            z_loss: 0.0,
        },
        data: DataConfig {
            source: "synthetic".to_string(),
            validation: None,
            val_fraction: 0.1,
            synthetic: SyntheticConfig::default(),
            reasoning: ReasoningConfig::default(),
        },
    }
}

fn small() -> TrainConfig {
    let mut c = tiny();
    c.run = RunConfig {
        steps: 5000,
        batch_size: 32,
        grad_accum: 1,
        seed: 0,
        eval_every: 250,
        eval_batches: 8,
        sample_every: 250,
        log_every: 1,
        checkpoint_every: 250,
        keep_checkpoints: 3,
        devices: 1,
        nodes: 1,
        precision: Precision::F32,
    };
    c.model = ModelConfig {
        vocab: 256,
        d_model: 512,
        layers: 8,
        heads: 8,
        seq_len: 256,
        experts: 64,
        expert_hidden: 128,
        moe_every: 1,
        dense_hidden: 2048,
        rope_theta: 10_000.0,
        init_std: 0.02,
    };
    c.routing.target = 8.0;
    c.optimizer.lr = 1e-3;
    c.optimizer.min_lr = 1e-4;
    c.optimizer.warmup_steps = 200;
    c
}

/// MoE-1.3B-6.9B-64E8A. Published: 64 experts, 8 activated (T = 8), about 1.3B active
/// and 6.9B total parameters, sequence length 2048, the GPT-NeoX tokenizer. Assumed (not
/// stated; the OLMoE-1B-7B layout, which has exactly these totals): d_model 2048, 16
/// blocks all MoE, 16 heads, SwiGLU experts of width 1024, vocabulary padded to 50304,
/// untied embeddings; AdamW at 4e-4 to 4e-5 with 2000 warm-up steps, about 1M tokens
/// per optimizer step (8 x 2048 x 64 accumulated); DTop-p defaults for the controller.
fn paper_13b() -> TrainConfig {
    let mut c = small();
    c.run = RunConfig {
        steps: 100_000,
        batch_size: 8,
        grad_accum: 64,
        seed: 0,
        eval_every: 1000,
        eval_batches: 16,
        sample_every: 1000,
        log_every: 1,
        checkpoint_every: 500,
        keep_checkpoints: 3,
        devices: 1,
        nodes: 1,
        precision: Precision::F32,
    };
    c.model = ModelConfig {
        vocab: 50_304,
        d_model: 2048,
        layers: 16,
        heads: 16,
        seq_len: 2048,
        experts: 64,
        expert_hidden: 1024,
        moe_every: 1,
        dense_hidden: 8192,
        rope_theta: 10_000.0,
        init_std: 0.02,
    };
    c.routing.target = 8.0;
    c.optimizer.lr = 4e-4;
    c.optimizer.min_lr = 4e-5;
    c.optimizer.warmup_steps = 2000;
    // Meant for token shards (`--data shards:GLOB`); the synthetic language at the same
    // vocabulary keeps the preset valid on its own.
    c.data.synthetic.vocab = c.model.vocab;
    c
}

fn finite_at_least(name: &'static str, value: f64, low: f64) -> Result<()> {
    if !(value.is_finite() && value >= low) {
        return Err(Error::param(
            name,
            value,
            format!("a finite value >= {low}"),
        ));
    }
    Ok(())
}

impl TrainConfig {
    /// The preset with a TOML file laid over it (only the fields the file sets change).
    pub fn from_preset_and_file(preset: Preset, file: Option<&Path>) -> Result<Self> {
        let mut config = preset.config();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::io("cannot read config", path, e))?;
            config = config.overlay_toml(&text).map_err(|e| match e {
                Error::Parse { message, .. } => Error::Parse {
                    what: "config file",
                    message: format!("{}: {message}", path.display()),
                },
                other => other,
            })?;
        }
        Ok(config)
    }

    /// This config with the fields of a TOML document replaced.
    pub fn overlay_toml(&self, text: &str) -> Result<Self> {
        let parse = |message: String| Error::Parse {
            what: "config",
            message,
        };
        let overlay: toml::Table = toml::from_str(text).map_err(|e| parse(e.to_string()))?;
        let mut base = toml::Table::try_from(self).map_err(|e| parse(e.to_string()))?;
        merge(&mut base, overlay);
        toml::Value::Table(base)
            .try_into()
            .map_err(|e: toml::de::Error| parse(e.to_string()))
    }

    /// The config as TOML (what `config.toml` in a run directory holds).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Parse {
            what: "config",
            message: e.to_string(),
        })
    }

    /// The threshold controller's settings.
    pub fn controller(&self) -> ControllerConfig {
        let r = &self.routing;
        ControllerConfig {
            target: r.target,
            num_experts: self.model.experts,
            kp: r.kp,
            ki: r.ki,
            p_min: r.p_min,
            p_max: r.p_max,
        }
    }

    /// Tokens per optimizer step, over all devices.
    pub fn tokens_per_step(&self) -> usize {
        self.run.devices * self.run.batch_size * self.run.grad_accum * self.model.seq_len
    }

    /// Checks every field; the error names the field, its value and what is expected.
    pub fn validate(&self) -> Result<()> {
        let run = &self.run;
        self.model.validate()?;
        for (name, value) in [
            ("run.steps", run.steps as usize),
            ("run.batch_size", run.batch_size),
            ("run.grad_accum", run.grad_accum),
            ("run.devices", run.devices),
            ("run.nodes", run.nodes),
            ("run.eval_batches", run.eval_batches),
            ("run.log_every", run.log_every as usize),
        ] {
            if value == 0 {
                return Err(Error::param(name, 0, "at least 1"));
            }
        }
        if !run.devices.is_multiple_of(run.nodes) {
            return Err(Error::param(
                "run.devices",
                run.devices,
                format!(
                    "a multiple of run.nodes ({}): every node runs as many ranks",
                    run.nodes
                ),
            ));
        }
        self.validate_routing()?;
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(Error::param("optimizer.lr", o.lr, "a finite value > 0"));
        }
        if !(o.min_lr.is_finite() && (0.0..=o.lr).contains(&o.min_lr)) {
            return Err(Error::param(
                "optimizer.min_lr",
                o.min_lr,
                format!("a value in [0, lr = {}]", o.lr),
            ));
        }
        finite_at_least("optimizer.weight_decay", o.weight_decay, 0.0)?;
        for (name, beta) in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(Error::param(name, beta, "a value in [0, 1)"));
            }
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return Err(Error::param("optimizer.eps", o.eps, "a finite value > 0"));
        }
        if let Some(clip) = o.grad_clip
            && !(clip.is_finite() && clip > 0.0)
        {
            return Err(Error::param(
                "optimizer.grad_clip",
                clip,
                "a finite norm > 0 (leave it out to disable clipping)",
            ));
        }
        let l = &self.loss;
        finite_at_least("loss.balance", l.balance, 0.0)?;
        finite_at_least("loss.entropy", l.entropy, 0.0)?;
        finite_at_least("loss.z_loss", l.z_loss, 0.0)?;
        self.validate_data()
    }

    fn validate_routing(&self) -> Result<()> {
        let r = &self.routing;
        let e = self.model.experts;
        if !(r.target.is_finite() && r.target >= 1.0 && r.target <= e as f64) {
            return Err(Error::param(
                "routing.target",
                r.target,
                format!("a value in [1, E = {e}] (model.experts)"),
            ));
        }
        if r.mode == RoutingMode::Topk && r.target.fract() != 0.0 {
            return Err(Error::param(
                "routing.target",
                r.target,
                "a whole number of experts in topk mode (k = T)",
            ));
        }
        if let Some(k_max) = r.k_max
            && !(k_max as f64 >= r.target && k_max <= e)
        {
            return Err(Error::param(
                "routing.k_max",
                k_max,
                format!(
                    "a cap in [T = {}, E = {e}] (below T the target is unreachable)",
                    r.target
                ),
            ));
        }
        if let Some(p) = r.threshold
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(Error::param("routing.threshold", p, "a value in (0, 1]"));
        }
        self.controller().validate()
    }

    fn validate_data(&self) -> Result<()> {
        let d = &self.data;
        if !(d.val_fraction > 0.0 && d.val_fraction < 1.0) {
            return Err(Error::param(
                "data.val_fraction",
                d.val_fraction,
                "a value in (0, 1)",
            ));
        }
        if d.source == "synthetic" {
            d.synthetic.validate()?;
            if d.synthetic.vocab != self.model.vocab {
                return Err(Error::param(
                    "data.synthetic.vocab",
                    d.synthetic.vocab,
                    format!("the model's vocabulary, model.vocab = {}", self.model.vocab),
                ));
            }
        } else if d.source == REASONING_SOURCE {
            d.reasoning.validate()?;
            if d.reasoning.vocab != self.model.vocab {
                return Err(Error::param(
                    "data.reasoning.vocab",
                    d.reasoning.vocab,
                    format!("the model's vocabulary, model.vocab = {}", self.model.vocab),
                ));
            }
        } else if d.source.starts_with(SHARDS_PREFIX) {
            if let Some(v) = &d.validation
                && !v.starts_with(SHARDS_PREFIX)
            {
                return Err(Error::param(
                    "data.validation",
                    v,
                    "validation shards as \"shards:GLOB\"",
                ));
            }
        } else if d.validation.is_some() {
            return Err(Error::param(
                "data.validation",
                d.validation.as_deref().unwrap_or_default(),
                "only with token shards (data.source = \"shards:GLOB\"); text files hold out their tail",
            ));
        } else if self.model.vocab < crate::data::BYTE_VOCAB {
            return Err(Error::param(
                "model.vocab",
                self.model.vocab,
                format!(
                    "at least {} for a byte-level text corpus ({})",
                    crate::data::BYTE_VOCAB,
                    d.source
                ),
            ));
        }
        Ok(())
    }
}

/// `data.source` / `data.validation` prefix naming token shards.
pub const SHARDS_PREFIX: &str = "shards:";

/// `data.source` naming the built-in reasoning language ([`crate::data::ReasoningLanguage`]).
pub const REASONING_SOURCE: &str = "synthetic:reasoning";

fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_have_their_documented_sizes() {
        for preset in [Preset::Tiny, Preset::Small, Preset::Paper13b64e8a] {
            preset.config().validate().unwrap();
        }
        assert_eq!(Preset::Tiny.config().model.parameters(), 461_122);
        let small = Preset::Small.config().model.parameters();
        assert!((100_000_000..120_000_000).contains(&small), "{small}");
        let paper = Preset::Paper13b64e8a.config();
        let total = paper.model.parameters() as f64;
        let active = paper.model.active_parameters(paper.routing.target);
        // The paper's name: 1.3B active of 6.9B total.
        assert!((total / 6.9e9 - 1.0).abs() < 0.02, "total {total:.3e}");
        assert!((active / 1.3e9 - 1.0).abs() < 0.03, "active {active:.3e}");
        assert_eq!(paper.tokens_per_step(), 1 << 20);
        assert_eq!((paper.model.experts, paper.model.seq_len), (64, 2048));
    }
}
