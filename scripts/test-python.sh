#!/usr/bin/env bash
# The Python package's tests: installs (once) maturin, pytest, torch, lightning and transformers into the
# repository's venv (the one scripts/python-env.sh makes), builds the extension in release
# mode with `maturin develop`, lints the extension crate (with and without its `cuda`
# feature), then runs pytest on python/tests (python/tests/test_cuda.py's GPU tests skip
# unless torch sees a GPU and the extension was built with `--features cuda`).
# A second run reuses the venv and cargo's build cache, so it takes seconds plus the build.
# The first install downloads torch from PyPI (with its CUDA libraries: PyPI has no CPU-only
# torch wheel for Linux x86_64), about 3 minutes and 5.5 GiB here.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="$(bash scripts/python-env.sh)"
venv="$(dirname "$(dirname "$python")")"
if ! "$python" -c "import maturin, pytest, torch, lightning, transformers" 2>/dev/null; then
  echo "installing maturin, pytest, torch, lightning and transformers into $venv (first run only)" >&2
  start=$(date +%s)
  # transformers: python/tests/test_hf.py loads our checkpoints with from_pretrained.
  "$python" -m pip install --quiet --disable-pip-version-check "maturin>=1.5,<2" pytest "torch>=2.1" "lightning>=2.1" \
    "transformers>=4.40"
  echo "installed in $(( $(date +%s) - start ))s" >&2
fi

# The extension links against this venv's interpreter.
export PYO3_PYTHON="$python"
echo "== cargo clippy -p uring-ckpt-python -- -D warnings"
cargo clippy -p uring-ckpt-python --all-targets -- -D warnings
# The CUDA build (device-memory saves) compiles without CUDA installed (cudarc loads the
# driver at run time): check and lint it, without building it.
echo "== cargo clippy -p uring-ckpt-python --features cuda -- -D warnings"
cargo clippy -p uring-ckpt-python --all-targets --features cuda -- -D warnings

echo "== maturin develop --release"
(cd python && VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" "$venv/bin/maturin" develop --release --quiet)

echo "== pytest python/tests"
"$python" -m pytest python/tests -q -p no:cacheprovider "$@"
