//! dtopp-web: the browser demo of the DTop-p controller and routing.
//!
//! The page runs the desktop app's simulator and views (`dtopp-desktop` without its
//! `live` feature, so no burn) in a canvas drawn through WebGL2. Each step's routing runs
//! on the WGSL kernels through WebGPU when the browser offers an adapter, otherwise on
//! the CPU reference; the simulator panel's badge says which (`?backend=cpu` in the
//! address forces the CPU).
//!
//! For scripts and tests the page keeps `<pre id="dtopp-status">` holding [`status`]'s
//! JSON, updated every step, and exposes `window.dtopp` with `setTarget(t)`,
//! `stepChange()`, `reset()`, `run(bool)`, `status()` and `history()`.
//!
//! - [`status`]: the status object (built natively too, so it is unit-tested);
//! - [`commands`]: what `window.dtopp` asks for, queued until the next frame;
//! - `start` (wasm32 only): the wasm-bindgen entry point and the DOM glue.

pub mod commands;
pub mod status;

#[cfg(target_arch = "wasm32")]
mod start;
#[cfg(target_arch = "wasm32")]
mod web_app;
