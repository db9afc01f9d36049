#!/usr/bin/env bash
# Creates (once) the virtual environment under the repository that the Python interop tests
# use: numpy and the upstream safetensors package as an independent reader.
# Usage: scripts/python-env.sh  -> prints the path of the venv's python.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv" >&2
fi
if ! "$venv/bin/python" -c "import numpy, safetensors" 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "numpy>=1.24" "safetensors>=0.4" >&2
fi
echo "$venv/bin/python"
