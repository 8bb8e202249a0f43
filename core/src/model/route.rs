//! A layer's routing on the model's device: which experts each token took, and where each
//! route's row sits among the experts' rows. The two layouts ([`super::ExpertLayout`])
//! differ only in how those rows are laid out ([`ExpertRows`]); dispatch, combine and
//! their gradients read the same maps either way.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// A layer's routing: the selection, the expert rows `R` the routes fill, and both
/// directions of each map, so that moving rows either way differentiates into a gather
/// ([`super::routed_rows`]).
#[derive(Clone, Debug)]
pub struct Route<B: Backend> {
    /// `[N, E]` 1 where token i selected expert j, else 0.
    pub selected: Tensor<B, 2, Int>,
    /// `[R]` the token of each expert row, expert-major and tokens ascending within an
    /// expert; `N` (a zero row) for an empty padded row.
    pub row_tokens: Tensor<B, 1, Int>,
    /// `[R]` flat index `i * E + j` into P of each row; `N E` for an empty padded row.
    pub row_sources: Tensor<B, 1, Int>,
    /// `[N, E]` the row of token i's route to expert j; `R` where j is not selected (or,
    /// padded, where its buffer overflowed, which the trainer detects and redoes).
    pub row_of: Tensor<B, 2, Int>,
    /// `[N, S]` token i's rows in rank order, padded with `R`. Built only on the
    /// backends whose MoE rows move by gathers ([`super::RowMovesBackend::BY_GATHERS`]),
    /// which alone use it.
    pub token_slots: Option<Tensor<B, 2, Int>>,
    /// How the rows are laid out.
    pub rows: ExpertRows<B>,
}

/// How a [`Route`]'s rows are laid out among the experts.
#[derive(Clone, Debug)]
pub enum ExpertRows<B: Backend> {
    /// Expert j owns rows `offsets[j]..offsets[j + 1]`, one per route (`E + 1` offsets,
    /// read by the host: burn's matrix products take the slices' shapes from it).
    Exact {
        /// `E + 1` exclusive offsets of each expert's routes.
        offsets: Vec<usize>,
    },
    /// Expert j owns rows `j C..(j + 1) C`, its routes first, then empty rows; nothing
    /// was read back.
    Padded {
        /// `C`, rows per expert.
        capacity: usize,
        /// `[1]` the first non-finite router logit in row-major order, `N E` when none:
        /// the trainer reads it with the step's counts.
        first_bad: Tensor<B, 1, Int>,
    },
    /// Expert j owns rows `offsets[j]..offsets[j + 1]`, one per route, of a bound `R`
    /// fixed on the host; rows from `offsets[E]` on are empty. Nothing was read back:
    /// the grouped products read the offsets on the device.
    Grouped {
        /// `[E + 1]` the experts' offsets, on the device (the last is the routes).
        offsets: Tensor<B, 1, Int>,
        /// `[1]` the first non-finite router logit, as in `Padded`.
        first_bad: Tensor<B, 1, Int>,
    },
}

impl<B: Backend> Route<B> {
    /// `R`, the expert rows (the routes in the exact layout, `E C` padded, the bound
    /// grouped).
    pub fn row_count(&self) -> usize {
        self.row_tokens.dims()[0]
    }

    /// The same route with every tensor through `int` and `int2` (for example from an
    /// inner backend to its autodiff wrapper).
    pub fn map<C: Backend>(
        self,
        int: impl Fn(Tensor<B, 1, Int>) -> Tensor<C, 1, Int>,
        int2: impl Fn(Tensor<B, 2, Int>) -> Tensor<C, 2, Int>,
    ) -> Route<C> {
        Route {
            selected: int2(self.selected),
            row_tokens: int(self.row_tokens),
            row_sources: int(self.row_sources),
            row_of: int2(self.row_of),
            token_slots: self.token_slots.map(&int2),
            rows: match self.rows {
                ExpertRows::Exact { offsets } => ExpertRows::Exact { offsets },
                ExpertRows::Padded {
                    capacity,
                    first_bad,
                } => ExpertRows::Padded {
                    capacity,
                    first_bad: int(first_bad),
                },
                ExpertRows::Grouped { offsets, first_bad } => ExpertRows::Grouped {
                    offsets: int(offsets),
                    first_bad: int(first_bad),
                },
            },
        }
    }
}
