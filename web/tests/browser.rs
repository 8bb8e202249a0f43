//! The built demo (`web/dist`, from `web/build.sh`) in the system's headless Chromium,
//! driven by `web/tests/browser.mjs` (playwright-core from `web/tests/node_modules`,
//! `npm ci` there): both compute paths (WebGPU, CPU), no console errors, a non-blank
//! canvas, a_t settling on T and again after `window.dtopp.setTarget`. Screenshots and
//! `results.json` go to `target/web-test/`.
//!
//! Skips, saying why, when the site, Node, the packages or Chromium are missing;
//! `DTOPP_REQUIRE_BROWSER=1` (set by `.ci/run`, which installs them all) makes that a
//! failure.

use std::path::{Path, PathBuf};
use std::process::Command;

fn skip_or_fail(reason: &str) {
    if std::env::var("DTOPP_REQUIRE_BROWSER").is_ok_and(|v| v == "1") {
        panic!("browser test required (DTOPP_REQUIRE_BROWSER=1) but {reason}");
    }
    eprintln!("SKIPPED browser test: {reason}");
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn demo_converges_and_responds_in_headless_chromium() {
    let root = root();
    let dist = root.join("web/dist");
    let tests = root.join("web/tests");
    let chromium = std::env::var("DTOPP_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !dist.join("index.html").exists() || !dist.join("dtopp_web_bg.wasm").exists() {
        return skip_or_fail("web/dist is not built (run web/build.sh)");
    }
    if Command::new("node").arg("--version").output().is_err() {
        return skip_or_fail("node is not installed");
    }
    if !tests.join("node_modules/playwright-core").exists() {
        return skip_or_fail("the driver's packages are missing (cd web/tests && npm ci)");
    }
    if !Path::new(&chromium).exists() {
        return skip_or_fail(&format!(
            "no Chromium at {chromium} (apt-get install chromium)"
        ));
    }
    let out = root.join("target/web-test");
    let output = Command::new("node")
        .arg(tests.join("browser.mjs"))
        .arg(&dist)
        .arg(&out)
        .env("DTOPP_CHROMIUM", &chromium)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser test failed ({}); results in {}:\n{stdout}\n{stderr}",
        output.status,
        out.join("results.json").display()
    );
    println!("{stdout}");
    for shot in ["demo-webgpu.png", "demo-cpu.png"] {
        assert!(out.join(shot).exists(), "no screenshot {shot}");
    }
}
