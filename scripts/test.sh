#!/usr/bin/env bash
# The test command (README, CI): make/reuse .venv, then run the whole default suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
# the web-demo test drives headless Chromium (Debian's package; pip cannot ship a browser)
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing chromium + chromium-driver for the browser test (apt)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
    >/dev/null 2>&1 || echo "warning: could not install chromium; the browser test will skip"
fi
exec .venv/bin/python -m pytest -q -ra "$@"
