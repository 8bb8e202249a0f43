//! One rank's view of a data-parallel run: its place among the ranks and the
//! all-reduces it takes part in, through burn's collective library (`burn-collective`,
//! one peer per thread and device, the aggregation done by the backend's own tensor
//! ops). Nothing here talks to other processes: burn does.
//!
//! Every rank calls the same all-reduces in the same order each step, so a rank that
//! fails must release the others: [`Rank::abort`] resets the collective, and every rank
//! blocked in (or later entering) an all-reduce gets an error instead of waiting forever.

use burn::collective::{
    CollectiveConfig, CollectiveError, PeerId, ReduceOperation, all_reduce, finish_collective,
    register, reset_collective,
};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};

use crate::error::{Error, Result};

/// Counts are summed as two f32 digits of base 2^12, so sums stay exact integers however
/// many tokens a micro-batch holds (one f32 is exact only up to 2^24).
const DIGIT: u64 = 1 << 12;

/// The message of the error a rank gets when another rank failed first.
pub(crate) const ANOTHER_RANK_FAILED: &str = "another rank failed";

/// A rank of a data-parallel run (0 is the leader: it evaluates, logs and writes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rank {
    /// This rank, in `0..world`.
    pub index: usize,
    /// Ranks in the run.
    pub world: usize,
}

impl Rank {
    /// Whether this rank evaluates, samples and writes the run directory.
    pub fn is_leader(&self) -> bool {
        self.index == 0
    }

    fn peer(&self) -> PeerId {
        PeerId::from(self.index)
    }

    /// Joins the collective on `device` with `config` (the same on every rank of the
    /// process: the local ranks, and the global level in a multi-node run); returns once
    /// every rank has joined.
    pub fn join<B: AutodiffBackend>(
        &self,
        device: &B::Device,
        config: CollectiveConfig,
    ) -> Result<()> {
        register::<B::InnerBackend>(self.peer(), device.clone(), config)
            .map_err(|e| self.error("joining the collective", e))
    }

    /// Leaves the collective after the last step.
    pub fn leave<B: AutodiffBackend>(&self) -> Result<()> {
        finish_collective::<B::InnerBackend>(self.peer())
            .map_err(|e| self.error("leaving the collective", e))
    }

    /// Releases every rank waiting in a collective operation (they get an error): what
    /// a failing rank does so the run stops instead of hanging.
    pub fn abort<B: AutodiffBackend>() {
        reset_collective::<B::InnerBackend>();
    }

    /// The element-wise mean of `values` over all ranks (every rank gets the same bits).
    ///
    /// Summed by burn, divided here: burn-collective divides a mean on its own server
    /// thread, and on CUDA with two nodes the host read of that result twice returned the
    /// undivided sum (docs/distributed.md). An f32 division on the host gives the same
    /// bits as the device's.
    pub fn mean<B: AutodiffBackend>(&self, values: &[f32], device: &B::Device) -> Result<Vec<f32>> {
        let world = self.world as f32;
        let sums = self.reduce::<B::InnerBackend>(values, ReduceOperation::Sum, device)?;
        Ok(sums.into_iter().map(|s| s / world).collect())
    }

    /// The element-wise sum of non-negative integer counts over all ranks, exact.
    pub fn sum_counts<B: AutodiffBackend>(
        &self,
        counts: &[u64],
        device: &B::Device,
    ) -> Result<Vec<u64>> {
        let digits: Vec<f32> = counts
            .iter()
            .flat_map(|&c| [(c / DIGIT) as f32, (c % DIGIT) as f32])
            .collect();
        let sums = self.reduce::<B::InnerBackend>(&digits, ReduceOperation::Sum, device)?;
        Ok(sums
            .chunks_exact(2)
            .map(|d| d[0] as u64 * DIGIT + d[1] as u64)
            .collect())
    }

    /// The mean of every parameter's gradient over all ranks (DDP's all-reduce).
    pub fn mean_gradients<B: AutodiffBackend>(
        &self,
        grads: GradientsParams,
    ) -> Result<GradientsParams> {
        grads
            .all_reduce::<B::InnerBackend>(self.peer(), ReduceOperation::Mean)
            .map_err(|e| self.error("all-reducing the gradients", e))
    }

    fn reduce<I: Backend>(
        &self,
        values: &[f32],
        op: ReduceOperation,
        device: &I::Device,
    ) -> Result<Vec<f32>> {
        let tensor =
            Tensor::<I, 1>::from_data(TensorData::new(values.to_vec(), [values.len()]), device);
        let reduced = all_reduce::<I>(self.peer(), tensor.into_primitive().tensor(), op)
            .map_err(|e| self.error("an all-reduce", e))?;
        Tensor::<I, 1>::from_primitive(TensorPrimitive::Float(reduced))
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| Error::Backend {
                backend: "burn-collective",
                message: format!("reading an all-reduce result back: {e:?}"),
            })
    }

    fn error(&self, during: &str, e: CollectiveError) -> Error {
        let message = match e {
            // What a reset leaves behind: the rank that reset reports the cause.
            CollectiveError::LocalServerMissing | CollectiveError::RegisterNotFirstOperation => {
                format!(
                    "rank {} stopped during {during}: {ANOTHER_RANK_FAILED} (or burn-collective's server stopped; a panic in it is printed above)",
                    self.index
                )
            }
            other => format!(
                "rank {} of {}: {during} failed: {other:?}",
                self.index, self.world
            ),
        };
        Error::Backend {
            backend: "burn-collective",
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DIGIT;

    #[test]
    fn count_digits_are_exact_f32_integers() {
        // The largest count a digit pair carries exactly: 2^24 * 2^12.
        let c: u64 = (1 << 36) - 1;
        let (hi, lo) = ((c / DIGIT) as f32, (c % DIGIT) as f32);
        assert_eq!(hi as u64 * DIGIT + lo as u64, c);
    }
}
