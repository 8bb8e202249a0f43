//! The `dtopp` command-line program.

// Every training step and routing op allocates its tensors afresh. glibc hands buffers
// this large back to the kernel when they are freed, so the next step faults them in
// again, page by page: 3 x 16 MiB allocated and written took 18.9 ms with glibc against
// 6.8 ms with mimalloc, which keeps the pages (docs/benchmarks.md, "CPU speed").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    dtopp::cli::main()
}
