//! `dtopp export DIR --safetensors OUT`: a run's weights for PyTorch / NumPy / JAX users.

use std::path::PathBuf;

use clap::Args;

use crate::error::Result;
use crate::train::export_safetensors;

#[derive(Debug, Args)]
pub(crate) struct ExportArgs {
    /// Run directory of `dtopp train` (its newest intact checkpoint is exported).
    #[arg(value_name = "DIR")]
    run: PathBuf,
    /// The weights file to write; the config goes beside it with extension .json.
    #[arg(long, value_name = "OUT.safetensors")]
    safetensors: PathBuf,
}

pub(crate) fn run(args: ExportArgs) -> Result<()> {
    let report = export_safetensors(&args.run, &args.safetensors)?;
    for damaged in &report.skipped {
        eprintln!("skipping a damaged checkpoint: {damaged}");
    }
    println!(
        "exported {} (step {}): {} tensors, {} parameters -> {} and {}",
        report.checkpoint.display(),
        report.step,
        report.tensors,
        report.parameters,
        report.weights.display(),
        report.config.display()
    );
    Ok(())
}
