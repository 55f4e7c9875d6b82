#!/usr/bin/env bash
# The main job, end to end on the built-in tiny model: make/reuse .venv, train the `smoke`
# recipe (every VILA stage, seconds), quantize + export a bundle (AWQ W4 LLM, INT8 ViT,
# ONNX, TensorRT check), then ask the bundle (ONNX Runtime) about a synthetic scene and a real
# photo (skimage's astronaut.png). The smoke model is barely trained, so its answers are
# rough; `edge-vila train recipes/tiny.yaml` is the full recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
OUT=${OUT:-runs/quickstart}
EV=.venv/bin/edge-vila
mkdir -p "$OUT"
PHOTO=$(.venv/bin/python -c "import skimage, pathlib; print(pathlib.Path(skimage.__file__).parent / 'data' / 'astronaut.png')")
SCENE="$OUT/scene.png"
.venv/bin/python -c "
from edge_vila.train import world
s = world.random_scene(world.rng_for(2024))
s.render(256).save('$SCENE'); print('scene:', s.caption())"
$EV train recipes/smoke.yaml --out "$OUT/train" --no-eval
$EV export "$OUT/train/stage3-sft" --out "$OUT/bundle" --group-size 32 --max-context 512 --report-n 30
$EV info "$OUT/bundle" > "$OUT/bundle-info.json"
$EV check "$OUT/bundle" --trt 10.3
$EV run "$OUT/bundle" --image "$SCENE" --prompt "What color is the circle?" --max-new-tokens 8
$EV run "$OUT/bundle" --image "$PHOTO" --prompt "What is in this photo?" --max-new-tokens 16
echo
echo "quickstart OK: checkpoint $OUT/train/stage3-sft, bundle $OUT/bundle"
