//! Token blocks spread over the cores with rayon's pool (which runs on the calling thread
//! on wasm32, where no threads can be spawned).

use rayon::prelude::*;

/// Values (`tokens * width`) per block: large enough that a block outweighs the pool's
/// hand-off (a few microseconds), small enough that two cores each get many blocks.
const BLOCK_VALUES: usize = 1 << 14;

/// Tokens per block for rows of `width` values.
pub(super) fn block_tokens(tokens: usize, width: usize) -> usize {
    (BLOCK_VALUES / width.max(1)).clamp(1, tokens.max(1))
}

/// Runs `f` on every block and returns the results in block order. A single block runs
/// on the calling thread: the small problems of a training step skip the pool's hand-off.
pub(super) fn map_blocks<T: Send, R: Send>(
    blocks: Vec<T>,
    f: impl Fn(T) -> R + Sync + Send,
) -> Vec<R> {
    if blocks.len() <= 1 {
        blocks.into_iter().map(f).collect()
    } else {
        blocks.into_par_iter().map(f).collect()
    }
}
