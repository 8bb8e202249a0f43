//! dtopp-desktop: the egui desktop app that trains small models live, replays run
//! directories and animates the controller and routing.
//!
//! A member of the workspace from the start so the layout is fixed; the app arrives with
//! the desktop issue. It will read the run directories `dtopp simulate --out` already
//! writes (`config.toml`, `metrics.jsonl`, `summary.json`).
