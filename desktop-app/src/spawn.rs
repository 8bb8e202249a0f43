//! Running a future to completion without an async runtime in the app: the browser's
//! event loop drives it on the web; on native the GPU read-backs it awaits complete once
//! the device is polled, so blocking on it returns at once.

use std::future::Future;

/// Runs `future`: in the background on the web, to completion now on native.
pub fn spawn_local<F: Future<Output = ()> + 'static>(future: F) {
    #[cfg(target_arch = "wasm32")]
    wasm_bindgen_futures::spawn_local(future);
    #[cfg(not(target_arch = "wasm32"))]
    pollster::block_on(future);
}
