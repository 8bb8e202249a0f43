//! The training objective (DESIGN.md section 1): next-token cross-entropy plus, per MoE
//! layer and averaged over layers, a Switch-style load-balancing loss, a router-entropy
//! loss and (off by default) the router z-loss.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::config::LossConfig;
use crate::model::long_reductions::{column_means, mean_of_all};
use crate::model::{MoeForward, TokenLossesBackend};

/// Mean next-token cross-entropy of logits `[N, V]` against targets `[N]`.
pub fn cross_entropy<B: TokenLossesBackend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    mean_of_all(B::token_losses(logits, targets))
}

/// Switch-style balance: `E * sum_j f_j * Pbar_j`, with `f_j` the fraction of routes
/// that went to expert `j` (a constant; with variable `k` the routes, not the tokens,
/// are what is balanced) and `Pbar_j` the mean router probability of expert `j`. Equal
/// to 1 when both are uniform. In a data-parallel run `expert_load` is the global
/// batch's (summed over ranks), so the mean of the ranks' gradients is the gradient of
/// the global batch's balance loss.
pub fn load_balance<B: Backend>(probs: Tensor<B, 2>, expert_load: &[u64]) -> Tensor<B, 1> {
    let e = expert_load.len();
    let routes: u64 = expert_load.iter().sum();
    let fraction: Vec<f32> = expert_load
        .iter()
        .map(|&c| c as f32 / routes.max(1) as f32)
        .collect();
    let fraction = Tensor::<B, 1>::from_data(TensorData::new(fraction, [e]), &probs.device());
    (column_means(probs) * fraction).sum() * e as f64
}

/// [`load_balance`] with the routes per expert `[E]` still on the device (the padded
/// layout's deferred read-back): the same fractions, computed there.
pub fn load_balance_on_device<B: Backend>(
    probs: Tensor<B, 2>,
    expert_load: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    let e = expert_load.dims()[0];
    let load = expert_load.float();
    let fraction = load.clone() / load.sum().clamp_min(1.0).expand([e]);
    (column_means(probs) * fraction).sum() * e as f64
}

/// Mean over tokens of the routing entropy `-sum_j P_ij ln P_ij` (nats).
pub fn router_entropy<B: Backend>(probs: Tensor<B, 2>) -> Tensor<B, 1> {
    let log = probs.clone().clamp_min(1e-12).log();
    mean_of_all((probs * log).sum_dim(1)).neg()
}

/// Mean over tokens of `logsumexp_j(z_ij)^2` of the raw router logits.
pub fn z_loss<B: Backend>(logits: Tensor<B, 2>) -> Tensor<B, 1> {
    let max = logits.clone().max_dim(1);
    let lse = (logits - max.clone()).exp().sum_dim(1).log() + max;
    mean_of_all(lse.square())
}

/// The parts of one micro-batch's loss.
#[derive(Debug)]
pub struct LossParts<B: Backend> {
    /// The differentiated total.
    pub total: Tensor<B, 1>,
    /// Cross-entropy.
    pub cross_entropy: Tensor<B, 1>,
    /// Load balance averaged over MoE layers.
    pub balance: Tensor<B, 1>,
    /// Router entropy averaged over MoE layers.
    pub entropy: Tensor<B, 1>,
}

/// Cross-entropy plus the weighted auxiliary losses of every MoE layer; `expert_load`
/// holds each layer's routes per expert (of this micro-batch, or of the global batch in
/// a data-parallel run).
pub fn total_loss<B: TokenLossesBackend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    moe: &[MoeForward<B>],
    expert_load: &[Vec<u64>],
    config: &LossConfig,
) -> LossParts<B> {
    let balances = moe
        .iter()
        .zip(expert_load)
        .map(|(layer, load)| load_balance(layer.probs.clone(), load))
        .collect();
    combine_losses(logits, targets, moe, balances, config)
}

/// [`total_loss`] with `expert_load` `[L, E]` on the device.
pub fn total_loss_on_device<B: TokenLossesBackend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    moe: &[MoeForward<B>],
    expert_load: Tensor<B, 2, Int>,
    config: &LossConfig,
) -> LossParts<B> {
    let [layers, e] = expert_load.dims();
    let balances = moe
        .iter()
        .zip(0..layers)
        .map(|(layer, l)| {
            let load = expert_load.clone().slice([l..l + 1, 0..e]).reshape([e]);
            load_balance_on_device(layer.probs.clone(), load)
        })
        .collect();
    combine_losses(logits, targets, moe, balances, config)
}

fn combine_losses<B: TokenLossesBackend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    moe: &[MoeForward<B>],
    balances: Vec<Tensor<B, 1>>,
    config: &LossConfig,
) -> LossParts<B> {
    let device = logits.device();
    let ce = cross_entropy(logits, targets);
    let layers = moe.len().max(1) as f64;
    let zero = || Tensor::<B, 1>::zeros([1], &device);
    let (mut balance, mut entropy, mut z) = (zero(), zero(), zero());
    for (layer, layer_balance) in moe.iter().zip(balances) {
        balance = balance + layer_balance;
        entropy = entropy + router_entropy(layer.probs.clone());
        if config.z_loss > 0.0 {
            z = z + z_loss(layer.logits.clone());
        }
    }
    let (balance, entropy, z) = (balance / layers, entropy / layers, z / layers);
    let mut total =
        ce.clone() + balance.clone() * config.balance + entropy.clone() * config.entropy;
    if config.z_loss > 0.0 {
        total = total + z * config.z_loss;
    }
    LossParts {
        total,
        cross_entropy: ce,
        balance,
        entropy,
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::{Int, Tensor, TensorData};

    use super::{cross_entropy, load_balance, load_balance_on_device, router_entropy, z_loss};

    type B = NdArray;

    fn t2(v: Vec<f32>, shape: [usize; 2]) -> Tensor<B, 2> {
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    fn scalar(t: Tensor<B, 1>) -> f32 {
        t.into_data().to_vec::<f32>().unwrap()[0]
    }

    #[test]
    fn losses_match_hand_computed_values() {
        // Uniform logits over 4 classes: cross-entropy ln 4.
        let targets = Tensor::<B, 1, Int>::from_data(
            TensorData::new(vec![0i64, 3], [2]),
            &Default::default(),
        );
        let ce = scalar(cross_entropy(t2(vec![0.0; 8], [2, 4]), targets));
        assert!((ce - 4f32.ln()).abs() < 1e-6);
        // Uniform probabilities and load: balance 1, entropy ln 4.
        let probs = t2(vec![0.25; 8], [2, 4]);
        assert!((scalar(load_balance(probs.clone(), &[1, 1, 1, 1])) - 1.0).abs() < 1e-6);
        assert!((scalar(router_entropy(probs)) - 4f32.ln()).abs() < 1e-6);
        // Everything on expert 0: balance E * 1 * 1 = 4, entropy 0.
        let peaked = t2(vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], [2, 4]);
        assert!((scalar(load_balance(peaked.clone(), &[2, 0, 0, 0])) - 4.0).abs() < 1e-6);
        assert!(scalar(router_entropy(peaked)).abs() < 1e-6);
        // The same fractions computed on the device, bit for bit (and no routes at all).
        let skewed = t2(vec![0.1, 0.2, 0.3, 0.4, 0.7, 0.1, 0.1, 0.1], [2, 4]);
        for load in [[3u64, 1, 0, 2], [0, 0, 0, 0]] {
            let on_device = Tensor::<B, 1, Int>::from_data(
                TensorData::new(load.iter().map(|&c| c as i64).collect(), [4]),
                &Default::default(),
            );
            assert_eq!(
                scalar(load_balance_on_device(skewed.clone(), on_device)),
                scalar(load_balance(skewed.clone(), &load))
            );
        }
        // z-loss of zero logits over 4 experts: (ln 4)^2.
        let z = scalar(z_loss(t2(vec![0.0; 8], [2, 4])));
        assert!((z - 4f32.ln().powi(2)).abs() < 1e-5);
    }

    /// burn's autodiff differentiates `a / b` through `recip(b)`. burn-ndarray's `simd`
    /// feature makes that reciprocal approximate (x86 `rcp`, 12 bits) on the aligned part
    /// of a buffer only, so gradients were off by up to 4e-4 and changed from call to
    /// call with the buffers' addresses (the workspace Cargo.toml leaves `simd` off).
    #[test]
    fn division_gradients_are_exact_and_repeatable() {
        use burn::backend::Autodiff;
        let device = Default::default();
        // Every length up to a few vectors, so every alignment of head and tail occurs.
        for n in [1usize, 7, 31, 32, 33, 100, 257, 1000] {
            let a: Vec<f32> = (0..n).map(|i| 1.0 + (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.5 + (i as f32 * 0.71).cos()).collect();
            let recip = Tensor::<B, 1>::from_data(TensorData::new(b.clone(), [n]), &device)
                .recip()
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let exact: Vec<f32> = b.iter().map(|x| 1.0 / x).collect();
            assert_eq!(recip, exact, "recip of {n} values");
            let grad_of_a = || {
                let ta =
                    Tensor::<Autodiff<B>, 1>::from_data(TensorData::new(a.clone(), [n]), &device)
                        .require_grad();
                let tb =
                    Tensor::<Autodiff<B>, 1>::from_data(TensorData::new(b.clone(), [n]), &device);
                let grads = (ta.clone() / tb).sum().backward();
                ta.grad(&grads)
                    .unwrap()
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap()
            };
            let first = grad_of_a();
            assert_eq!(first, exact, "d(a / b)/da of {n} values");
            for _ in 0..8 {
                assert_eq!(grad_of_a(), first, "d(a / b)/da of {n} values, again");
            }
        }
    }
}
