//! `dtopp-desktop [RUN_DIR ...] [--live] [--exit-after SECONDS]`: the desktop app.

use std::path::PathBuf;
use std::process::ExitCode;

use dtopp_desktop::{DesktopApp, StartOptions};

const USAGE: &str = "usage: dtopp-desktop [RUN_DIR ...] [--live] [--exit-after SECONDS]

  RUN_DIR           run directories (dtopp train / dtopp simulate --out) to open in Replay
  --live            start training the tiny model at once
  --exit-after S    close after S seconds and print the frame rate";

fn parse_args() -> Result<StartOptions, String> {
    let mut options = StartOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--live" => options.live = true,
            "--exit-after" => {
                let value = args
                    .next()
                    .ok_or("--exit-after needs a number of seconds")?;
                let seconds: f64 = value
                    .parse()
                    .map_err(|_| format!("--exit-after: {value:?} is not a number of seconds"))?;
                options.exit_after = Some(seconds);
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            flag if flag.starts_with('-') => return Err(format!("unknown option {flag}\n{USAGE}")),
            dir => options.replay_dirs.push(PathBuf::from(dir)),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(o) => o,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::FAILURE;
        }
    };
    let native = eframe::NativeOptions {
        viewport: eframe::egui::ViewportBuilder::default()
            .with_title("dtopp — DTop-p MoE routing")
            .with_inner_size([1280.0, 820.0]),
        ..Default::default()
    };
    match eframe::run_native(
        "dtopp-desktop",
        native,
        Box::new(move |cc| Ok(Box::new(DesktopApp::new(cc, options)))),
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot open the window: {e}");
            ExitCode::FAILURE
        }
    }
}
