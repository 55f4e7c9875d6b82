#!/usr/bin/env bash
# The main job, end to end (make/reuse .venv first):
#   1. train  the `smoke` recipe: every stage of VILA's recipe in seconds (the path; a barely
#             trained model, not the one shown below)
#   2. quantize + export  models/shapes-tiny, the checkpoint this repository ships (trained by
#             recipes/tiny.yaml; its edge_vila_model.json records recipe, commit and eval), as
#             `edge-vila export` does by default: AWQ W4 g128 LLM, INT8 ViT, ONNX, quality gate;
#             then the static TensorRT check
#   3. run    the bundle (ONNX Runtime) on 5 held-out synthetic scenes (question, answer,
#             truth), its held-out VQA accuracy on $N questions, and one real photo
# Writes $OUT/summary.json: {"vqa_accuracy", "n", "seconds", ...}.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s.%N)
bash scripts/venv.sh
OUT=${OUT:-runs/quickstart}
N=${N:-200}
MODEL=models/shapes-tiny
EV=.venv/bin/edge-vila
PY=.venv/bin/python
mkdir -p "$OUT"
PHOTO=$($PY -c "import skimage, pathlib; print(pathlib.Path(skimage.__file__).parent / 'data' / 'astronaut.png')")

echo "== 1/3 train: recipes/smoke.yaml (all four stages, a few seconds each)"
$EV -q train recipes/smoke.yaml --out "$OUT/train" --no-eval
echo "== 2/3 quantize + export: $MODEL -> $OUT/bundle"
$EV -q export "$MODEL" --out "$OUT/bundle" --max-context 512 --report-n 100
$EV check "$OUT/bundle" --trt 10.3
echo "== 3/3 run the bundle: 5 held-out scenes (images in $OUT/scenes), then $N held-out questions"
$EV -q eval "$OUT/bundle" --n "$N" --show 5 --image-dir "$OUT/scenes" --no-text-probe --out "$OUT/eval.json"
echo "-- a real photo (skimage's astronaut.png; the model only knows the shapes world):"
$EV -q run "$OUT/bundle" --image "$PHOTO" --prompt "What shape is in the image?" --max-new-tokens 12

$PY - "$OUT" "$START" "$MODEL" <<'PY'
import json, subprocess, sys, time
from pathlib import Path
from edge_vila.fsutil import atomic_write_json
out, start, model = Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
ev = json.loads((out / "eval.json").read_text())
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
summary = {"vqa_accuracy": ev["accuracy"], "n": ev["n"], "seconds": round(time.time() - start, 1),
           "per_type": ev["per_type"], "bundle": str(out / "bundle"), "backend": "onnxruntime",
           "model": str(model), "model_card": json.loads((model / "edge_vila_model.json").read_text()),
           "date": time.strftime("%Y-%m-%d"), "commit": commit or None}
atomic_write_json(out / "summary.json", summary)
print(f"\nquickstart OK in {summary['seconds']:.0f} s: held-out VQA {ev['accuracy'] * 100:.1f}% on {ev['n']} "
      f"questions (bundle {out / 'bundle'}); summary in {out / 'summary.json'}")
PY
