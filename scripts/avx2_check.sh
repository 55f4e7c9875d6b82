#!/usr/bin/env bash
# The runtime on an x86 CPU with AVX2 but no AVX-512 and no VNNI (Zen 3, Haswell..Skylake
# workstations), emulated: qemu-x86_64 -cpu EPYC-Milan runs this venv's python, so CPUID answers
# as that CPU does and both our kernels' and ONNX Runtime's (MLAS) dispatch take their AVX2 /
# pre-VNNI paths. tests/emulated/check_x86_avx2.py then holds our ops (built -march=x86-64-v3)
# against the numpy references, the host-exported bundle against the host's greedy tokens, and
# the INT8 ViT forms against the float ViT (U8U8 and S8 cosine >= 0.999).
#
# Emulation proves correctness, not speed: no figure from this run says how fast such a CPU is.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
QEMU_CPU=${QEMU_CPU:-EPYC-Milan}
bash scripts/venv.sh >/dev/null
PY=.venv/bin/python
if ! command -v qemu-x86_64-static >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing qemu-user-static (apt)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static; } >/dev/null
  else
    echo "avx2_check: needs qemu-user-static (Debian package); install it and rerun" >&2
    exit 2
  fi
fi
WORK=$(mktemp -d /tmp/edge-vila-avx2.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
echo "== host side: a tiny INT4 bundle, its greedy tokens, the float ViT's features ($WORK)"
$PY tests/emulated/make_reference.py "$WORK"

echo "== emulated AVX2 CPU: qemu-x86_64 -cpu $QEMU_CPU"
# our ops are compiled on first use into a fresh cache, for the emulated CPU rather than the host
export EDGE_VILA_MARCH=x86-64-v3 XDG_CACHE_HOME=$WORK/xdg PYTHONPATH="$PWD" EDGE_VILA_THREADS=2
# qemu warns once per CPUID feature TCG lacks (xsavec, xsaves): noise, not failures
qemu-x86_64-static -cpu "$QEMU_CPU" "$PY" tests/emulated/check_x86_avx2.py "$WORK" 2> >(grep -v "TCG doesn't support" >&2)
echo "avx2_check OK in $(( $(date +%s) - START )) s (emulated: correctness only, not speed)"
