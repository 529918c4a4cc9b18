#!/usr/bin/env bash
# Installs what the tests need and runs every test: unit and integration
# tests of the whole workspace, then the conformance suite against each
# backend this build includes, with its report written to
# $CARGO_TARGET_DIR/conformance-report/<backend>/.
set -euo pipefail
cd "$(dirname "$0")/.."

# A persistent target dir outside the clone keeps repeated runs fast.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dprim/target}"

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found; install Rust from https://rustup.rs and re-run" >&2
    exit 2
fi

echo "==> cargo test --workspace"
cargo test --workspace --locked

echo "==> conformance suite: memory"
cargo run --locked -q -p dprim-runtime --bin dprim -- \
    conformance --report "$CARGO_TARGET_DIR/conformance-report/memory"
