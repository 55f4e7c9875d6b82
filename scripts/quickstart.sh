#!/usr/bin/env bash
# The main job, end to end on the built-in tiny model: make/reuse .venv, write a tiny
# VILA checkpoint and chat with it about a real photo (skimage's astronaut.png).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
OUT=${OUT:-runs/quickstart}
mkdir -p "$OUT"
PHOTO=$(.venv/bin/python -c "import skimage, pathlib; print(pathlib.Path(skimage.__file__).parent / 'data' / 'astronaut.png')")
.venv/bin/edge-vila make-tiny "$OUT/tiny-ckpt"
.venv/bin/edge-vila info "$OUT/tiny-ckpt"
.venv/bin/edge-vila chat "$OUT/tiny-ckpt" --image "$PHOTO" --prompt "What is in this photo?" --max-new-tokens 24
echo
echo "quickstart OK (random weights: the answer is noise; the path is what is checked)"
