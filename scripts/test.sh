#!/usr/bin/env bash
# The whole test suite: formatting, lints, the Python interop venv, a short benchmark on each
# engine (so the main command cannot silently break), every Rust test and doctest, then the
# Python package (extension build, pytest with torch and Lightning).
# README's test command and .ci/run both call this.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

step() { printf '\n== %s\n' "$*"; }

step "toolchain"
cargo --version
rustup component list --installed 2>/dev/null | grep -E '^(rustfmt|clippy)' || true

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo clippy --all-targets --features failpoints -- -D warnings"
cargo clippy --all-targets --features failpoints -- -D warnings

step "cargo clippy --all-targets --features cuda -- -D warnings"
cargo clippy --all-targets --features cuda -- -D warnings

step "cargo build --tests --features cuda (tests/cuda.rs compiles; it runs on a GPU: scripts/gpu-check.sh)"
cargo build --tests --features cuda

step "fuzz targets build (running them: see RELIABILITY.md)"
cargo check --manifest-path fuzz/Cargo.toml --quiet

step "python venv for the interop tests (numpy, safetensors)"
bash scripts/python-env.sh

step "bench smoke run on each engine"

for engine in uring pwrite buffered; do
  cargo run --release --quiet -- bench --size 16MiB --repeat 1 --engine "$engine" --json "${CARGO_TARGET_DIR:-target}/bench-smoke-$engine.json"
done

step "cargo test"
cargo test --all-targets
cargo test --doc

step "cargo test --features failpoints (fault injection, crash points, power loss)"
cargo test --all-targets --features failpoints

step "python package (scripts/test-python.sh)"
bash scripts/test-python.sh
