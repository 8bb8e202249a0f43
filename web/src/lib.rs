//! dtopp-web: the browser demo (wasm-bindgen) of the PI controller and routing.
//!
//! A member of the workspace from the start so the layout is fixed; the demo arrives with
//! the web issue. It will use `dtopp` without its `train` feature (no burn in the wasm),
//! i.e. `dtopp::controller`, `dtopp::sim` and `dtopp::cpu`, which build for wasm32.
