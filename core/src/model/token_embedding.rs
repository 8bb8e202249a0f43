//! The token embedding's row lookup, with a gradient made of gathers.
//!
//! The gradient of a lookup adds, for every vocabulary row, the output gradients of all
//! positions that read it. burn's `select` differentiates into `select_assign`, which
//! burn-cubecl 0.21 runs as one invocation per column looping over all N positions:
//! serial on a GPU, and cut off after 65535 iterations on lavapipe. Here the sum is a tree
//! of gathers instead. The positions are grouped by token on the host ([`FoldPlan`]): from
//! the trainer's host copy of the batch during the forward pass ([`embed_host_tokens`]),
//! or from one read-back in the backward pass ([`embed_tokens`]); each pass then adds up to
//! [`FOLD_WIDTH`] rows of a token into one, until each distinct token has one row, and one
//! last gather lays those rows out as the `[V, D]` gradient (a zero row for tokens the
//! batch does not contain). Same backends as the MoE layer's rows
//! ([`RowMovesBackend::BY_GATHERS`], whose `sum_slots` adds the rows); the others keep
//! burn's scatter, a plain loop on a CPU.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::IntTensor;
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};

use super::routed_rows::{RowMovesBackend, float};

/// The most rows one pass adds into one: each pass shrinks a token's rows this many
/// times, so a token seen c times takes `ceil(log_8 c)` passes.
const FOLD_WIDTH: usize = 8;

/// `table[tokens[i]]` for every `i`: `[N, D]` from `table` `[V, D]`.
pub fn embed_tokens<B: RowMovesBackend>(
    table: Tensor<B, 2>,
    tokens: Tensor<B, 1, Int>,
) -> Tensor<B, 2> {
    embed(table, tokens, None)
}

/// [`embed_tokens`] given the same tokens as a host copy too (the trainer has them): the
/// gradient's grouping is planned here, so the backward pass reads nothing back.
///
/// # Panics
/// If `host` and `tokens` differ in length.
pub fn embed_host_tokens<B: RowMovesBackend>(
    table: Tensor<B, 2>,
    tokens: Tensor<B, 1, Int>,
    host: &[i64],
) -> Tensor<B, 2> {
    assert_eq!(
        host.len(),
        tokens.dims()[0],
        "the host copy of the tokens has another length than the tokens"
    );
    embed(table, tokens, Some(host))
}

fn embed<B: RowMovesBackend>(
    table: Tensor<B, 2>,
    tokens: Tensor<B, 1, Int>,
    host: Option<&[i64]>,
) -> Tensor<B, 2> {
    B::embed_rows(table, tokens, host)
}

/// How the gradient rows of N positions fold into one row per vocabulary entry.
#[derive(Clone, Debug)]
struct FoldPlan {
    /// Each pass: `[R, W]` rows of the pass before (of the positions, for the first) to
    /// add into each of its R rows, padded with the row count before (a zero row).
    passes: Vec<(Vec<i64>, [usize; 2])>,
    /// `[V]` the row of the last pass that holds each token's sum; that pass's row count
    /// (a zero row) for tokens that do not occur.
    vocab_rows: Vec<i64>,
}

/// Groups the positions of `tokens` by token and plans the passes that add each group
/// into one row.
///
/// # Panics
/// If a token is outside `0..vocab` (the data readers reject such tokens first).
fn fold_plan(tokens: &[i64], vocab: usize) -> FoldPlan {
    let mut groups: Vec<Vec<i64>> = vec![Vec::new(); vocab];
    for (position, &token) in tokens.iter().enumerate() {
        let group = usize::try_from(token)
            .ok()
            .and_then(|t| groups.get_mut(t))
            .unwrap_or_else(|| {
                panic!(
                    "token {token} at position {position} is outside the vocabulary (0..{vocab})"
                )
            });
        group.push(position as i64);
    }
    let present: Vec<usize> = (0..vocab).filter(|&t| !groups[t].is_empty()).collect();
    let mut groups: Vec<Vec<i64>> = present
        .iter()
        .map(|&t| std::mem::take(&mut groups[t]))
        .collect();
    let mut rows_before = tokens.len();
    let mut passes = Vec::new();
    loop {
        let widest = groups.iter().map(Vec::len).max().unwrap_or(0);
        if widest <= 1 {
            break;
        }
        let width = widest.min(FOLD_WIDTH);
        let mut index = Vec::new();
        for group in &mut groups {
            let folded: Vec<i64> = group
                .chunks(width)
                .map(|chunk| {
                    let row = (index.len() / width) as i64;
                    index.extend_from_slice(chunk);
                    index.resize(index.len() + width - chunk.len(), rows_before as i64);
                    row
                })
                .collect();
            *group = folded;
        }
        rows_before = index.len() / width;
        passes.push((index, [rows_before, width]));
    }
    let mut vocab_rows = vec![rows_before as i64; vocab];
    for (&token, group) in present.iter().zip(&groups) {
        vocab_rows[token] = group[0];
    }
    FoldPlan { passes, vocab_rows }
}

/// The `[V, D]` gradient of the table from the `[N, D]` gradient of the lookup.
fn fold_gradient<B: RowMovesBackend>(grad: Tensor<B, 2>, plan: FoldPlan) -> Tensor<B, 2> {
    let device = grad.device();
    let vocab = plan.vocab_rows.len();
    let mut rows = grad;
    for (index, shape) in plan.passes {
        let index = Tensor::<B, 2, Int>::from_data(TensorData::new(index, shape), &device);
        rows = B::sum_slots(rows, None, &index);
    }
    let d = rows.dims()[1];
    let padded = Tensor::cat(vec![rows, Tensor::zeros([1, d], &device)], 0);
    let vocab_rows =
        Tensor::<B, 1, Int>::from_data(TensorData::new(plan.vocab_rows, [vocab]), &device);
    padded.select(0, vocab_rows)
}

/// The lookup of [`embed_tokens`] on `Autodiff<I>` with the gradient folded by gathers
/// ([`RowMovesBackend::embed_rows`] of the gather backends).
pub(super) fn embed_tokens_tracked<I: RowMovesBackend, C: CheckpointStrategy>(
    table: Tensor<Autodiff<I, C>, 2>,
    tokens: Tensor<Autodiff<I, C>, 1, Int>,
    host: Option<&[i64]>,
) -> Tensor<Autodiff<I, C>, 2> {
    #[derive(Debug)]
    struct EmbedTokens;

    impl<I: RowMovesBackend> Backward<I, 1> for EmbedTokens {
        /// The tokens `[N]`, the vocabulary size, and the plan where the tokens were
        /// given on the host.
        type State = (IntTensor<I>, usize, Option<FoldPlan>);

        fn backward(
            self,
            ops: Ops<Self::State, 1>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let grad = grads.consume::<I>(&ops.node);
            let [parent] = ops.parents;
            let Some(parent) = parent else { return };
            let (tokens, vocab, plan) = ops.state;
            // Without a host copy, one read-back per backward pass: the grouping is
            // planned on the host.
            let plan = plan.unwrap_or_else(|| {
                crate::host_reads::count(1);
                let tokens = Tensor::<I, 1, Int>::from_primitive(tokens)
                    .into_data()
                    .convert::<i64>()
                    .to_vec::<i64>()
                    .unwrap_or_else(|e| panic!("reading the batch's tokens back: {e:?}"));
                fold_plan(&tokens, vocab)
            });
            let table_grad = fold_gradient(float::<I, 2>(grad), plan);
            grads.register::<I>(parent.id, table_grad.into_primitive().tensor());
        }
    }

    let vocab = table.dims()[0];
    let table = table.into_primitive().tensor();
    let tokens = Tensor::<I, 1, Int>::from_primitive(tokens.into_primitive());
    let out = float::<I, 2>(table.primitive)
        .select(0, tokens.clone())
        .into_primitive()
        .tensor();
    let out = match EmbedTokens
        .prepare::<NoCheckpointing>([table.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let plan = host.map(|h| fold_plan(h, vocab));
            prep.finish((tokens.into_primitive(), vocab, plan), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Int, Tensor, TensorData};

    use super::{FOLD_WIDTH, embed_tokens_tracked, fold_plan};
    use crate::rng::SplitMix64;

    type B = Autodiff<NdArray>;

    /// Every position lands in exactly its token's row, through passes of at most
    /// FOLD_WIDTH rows each.
    #[test]
    fn the_plan_adds_each_position_into_its_tokens_row() {
        let mut rng = SplitMix64::new(11);
        for (n, vocab) in [
            (1usize, 1usize),
            (1, 7),
            (5, 3),
            (100, 2),
            (513, 37),
            (2000, 5),
        ] {
            // Skewed: low token ids far more often, like a real corpus.
            let tokens: Vec<i64> = (0..n)
                .map(|_| ((rng.uniform().powi(3)) * vocab as f64) as i64)
                .collect();
            let plan = fold_plan(&tokens, vocab);
            // Follow each position's one-hot through the passes.
            let mut rows: Vec<Vec<f64>> = (0..n)
                .map(|i| {
                    let mut r = vec![0.0; n];
                    r[i] = 1.0;
                    r
                })
                .collect();
            for (index, [r, w]) in &plan.passes {
                assert!(*w <= FOLD_WIDTH && *w >= 2, "width {w}");
                assert_eq!(index.len(), r * w);
                rows = (0..*r)
                    .map(|row| {
                        let mut sum = vec![0.0; n];
                        for &i in &index[row * w..(row + 1) * w] {
                            if let Some(src) = rows.get(i as usize) {
                                sum.iter_mut().zip(src).for_each(|(a, b)| *a += b);
                            } else {
                                assert_eq!(i as usize, rows.len(), "padding reads the zero row");
                            }
                        }
                        sum
                    })
                    .collect();
            }
            for token in 0..vocab {
                let want: Vec<f64> = tokens
                    .iter()
                    .map(|&t| if t == token as i64 { 1.0 } else { 0.0 })
                    .collect();
                let row = plan.vocab_rows[token] as usize;
                let got = rows.get(row).cloned().unwrap_or_else(|| {
                    assert_eq!(row, rows.len(), "absent token reads the zero row");
                    vec![0.0; n]
                });
                assert_eq!(got, want, "n {n} vocab {vocab} token {token}");
            }
            let most = (0..vocab)
                .map(|t| tokens.iter().filter(|&&x| x == t as i64).count())
                .max()
                .unwrap();
            let passes = (most as f64).log(FOLD_WIDTH as f64).ceil() as usize;
            assert_eq!(plan.passes.len(), passes, "n {n} vocab {vocab}");
        }
    }

    #[test]
    #[should_panic(expected = "token 9 at position 1 is outside the vocabulary (0..4)")]
    fn a_token_outside_the_vocabulary_is_named() {
        fold_plan(&[0, 9], 4);
    }

    /// The tracked lookup (on ndarray here; generic over the inner backend) has the value
    /// and gradient of burn's select.
    #[test]
    fn the_lookup_matches_select_with_its_gradient() {
        let device = Default::default();
        let mut rng = SplitMix64::new(4);
        let (v, d, n) = (13usize, 3usize, 300usize);
        let table_v: Vec<f32> = (0..v * d).map(|_| rng.normal() as f32).collect();
        let tokens_v: Vec<i64> = (0..n)
            .map(|_| ((rng.uniform().powi(2)) * (v - 2) as f64) as i64)
            .collect();
        let out_w: Tensor<B, 2> = Tensor::from_data(
            TensorData::new((0..n * d).map(|_| rng.normal() as f32).collect(), [n, d]),
            &device,
        );
        let tokens =
            Tensor::<B, 1, Int>::from_data(TensorData::new(tokens_v.clone(), [n]), &device);
        let mut results = Vec::new();
        // burn's select first, then ours reading the tokens back, then ours given them.
        for ours in [None, Some(None), Some(Some(tokens_v.as_slice()))] {
            let table =
                Tensor::<B, 2>::from_data(TensorData::new(table_v.clone(), [v, d]), &device)
                    .require_grad();
            let out = match ours {
                Some(host) => {
                    embed_tokens_tracked::<NdArray, _>(table.clone(), tokens.clone(), host)
                }
                None => table.clone().select(0, tokens.clone()),
            };
            let grads = (out.clone() * out.clone() * out_w.clone()).sum().backward();
            let grad: Vec<f32> = table.grad(&grads).unwrap().into_data().to_vec().unwrap();
            let out: Vec<f32> = out.inner().into_data().to_vec().unwrap();
            results.push((out, grad));
        }
        let b = &results[0].1;
        for (out, a) in &results[1..] {
            assert_eq!(out, &results[0].0);
            assert!(
                a.iter()
                    .zip(b)
                    .all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs())),
                "{a:?} vs {b:?}"
            );
            // The two tokens never drawn get a zero gradient.
            assert!(a[(v - 2) * d..].iter().all(|&g| g == 0.0));
        }
        // Given on the host, the plan is the one the backward pass would have read.
        assert_eq!(results[1].1, results[2].1);
    }
}
