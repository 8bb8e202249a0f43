//! The `dtopp` command-line program.

// Every training step and routing op allocates its tensors afresh. glibc hands buffers
// this large back to the kernel when they are freed, so the next step faults them in
// again, page by page: 3 x 16 MiB allocated and written took 18.9 ms with glibc against
// 6.8 ms with mimalloc, which keeps the pages (docs/benchmarks.md, "CPU speed").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in the C enum of mimalloc.h, v2 and
/// v3; libmimalloc-sys 0.1.49 names no constant for it).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// mimalloc still returns freed pages to the kernel 10 ms after they are freed, and the
/// next step's tensors, allocated a few ms later, fault them in again and the kernel
/// clears them: 24% of a `bench/cpu-mid.toml` step was page clearing, and 72,021 page
/// faults per run fell to 834 without purging (docs/benchmarks.md, "CPU speed"). A
/// training process reuses its peak every step, so it keeps its pages. The
/// `MIMALLOC_PURGE_DELAY` environment variable still overrides this.
fn keep_freed_pages() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    #[allow(unsafe_code)]
    // SAFETY: sets one process-wide option, which mimalloc reads atomically; no memory is
    // touched and any moment is valid.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
    }
}

fn main() -> std::process::ExitCode {
    keep_freed_pages();
    dtopp::cli::main()
}
