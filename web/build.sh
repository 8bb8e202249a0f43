#!/usr/bin/env bash
# Builds the browser demo into web/dist/ (index.html, dtopp_web.js, dtopp_web_bg.wasm),
# a static site any server can serve. Needs only the crates registry: wasm-bindgen-cli is
# installed at the exact wasm-bindgen version of Cargo.lock if it is missing (no Trunk,
# no wasm-opt download).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}
export PATH="$HOME/.cargo/bin:$PATH"

version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3 }' Cargo.lock)
if [ -z "$version" ]; then
  echo "error: no wasm-bindgen in Cargo.lock" >&2
  exit 1
fi
have=$(wasm-bindgen --version 2>/dev/null | awk '{ print $2 }' || true)
if [ "$have" != "$version" ]; then
  echo "== installing wasm-bindgen-cli $version (the version in Cargo.lock; found: ${have:-none})"
  cargo install wasm-bindgen-cli --version "=$version"
fi
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  echo "== adding the wasm32-unknown-unknown target"
  rustup target add wasm32-unknown-unknown
fi

echo "== cargo build -p dtopp-web (wasm32, profile web-release)"
cargo build -p dtopp-web --target wasm32-unknown-unknown --profile web-release
wasm="$target_dir/wasm32-unknown-unknown/web-release/dtopp_web.wasm"

echo "== wasm-bindgen $version"
rm -rf web/dist
mkdir -p web/dist
wasm-bindgen --target web --no-typescript --remove-name-section --remove-producers-section --out-dir web/dist "$wasm"
cp web/index.html web/dist/index.html

raw=$(stat -c %s web/dist/dtopp_web_bg.wasm)
gz=$(gzip -9 -c web/dist/dtopp_web_bg.wasm | wc -c)
echo "web/dist/dtopp_web_bg.wasm: $raw bytes raw, $gz bytes gzip -9"
echo "serve it with e.g.: python3 -m http.server -d web/dist 8080   (then open http://127.0.0.1:8080)"
