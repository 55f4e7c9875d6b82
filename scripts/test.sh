#!/usr/bin/env bash
# The test command (README, CI): make/reuse .venv, then run the whole default suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
exec .venv/bin/python -m pytest -q -ra "$@"
