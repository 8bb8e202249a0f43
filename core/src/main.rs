//! The `dtopp` command-line program.

fn main() -> std::process::ExitCode {
    dtopp::cli::main()
}
