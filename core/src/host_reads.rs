//! Counting the host's reads of a backend's results: every place where the trainer or the
//! routing ops wait for values computed on the backend's device (a `into_data` of a
//! training tensor, a routing kernel's buffers read back). `dtopp bench train` reports
//! them per optimizer step (`host_reads_per_step`), counted here, not estimated.
//!
//! The count is per thread: a data-parallel rank runs on a thread of its own.

use std::cell::Cell;

thread_local! {
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// Counts `reads` reads of the backend's results by this thread.
pub fn count(reads: u64) {
    READS.with(|r| r.set(r.get() + reads));
}

/// Reads counted on this thread so far.
pub fn total() -> u64 {
    READS.with(Cell::get)
}
