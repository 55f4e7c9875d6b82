#!/usr/bin/env bash
# The runtime on aarch64 (the Jetson Orin's CPU), emulated: an arm64 Debian userland run by
# qemu-user, aarch64 wheels of the runtime's dependencies, our ONNX Runtime ops built by the
# aarch64 cross compiler (NEON + dot product, as an Orin's Cortex-A78AE has), then
# tests/emulated/check_arm64.py under qemu: the package imports without torch, the ops match the
# numpy references, and a bundle exported here on x86 gives the same greedy tokens as on x86.
#
# Emulation proves correctness, not speed: no figure from this run says how fast an Orin is.
#
# Cached between runs in $EDGE_VILA_ARM64_CACHE (default ~/.cache/edge-vila/arm64): the
# userland (debootstrap, first stage only - with no binfmt_misc the second stage's chroot cannot
# run, so the downloaded packages are unpacked directly) and the wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
CACHE=${EDGE_VILA_ARM64_CACHE:-$HOME/.cache/edge-vila/arm64}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOT=$CACHE/rootfs
PYVER=3.11   # bookworm's python3
# the device runtime's dependencies (setup.cfg install_requires + the ort extra; onnx builds the
# fast graph) and pytest, which runs the op tests there. onnxruntime 1.23.2: the aarch64 wheels
# of 1.24 and later die with SIGSEGV at import under Debian 12's qemu-user 7.2 (-cpu max,
# cortex-a76 and neoverse-n1 alike; 1.21-1.23 import and run) - an emulator limit as far as this
# machine can tell, not checked on aarch64 hardware
REQS="numpy>=1.24 pillow>=10 tokenizers>=0.20 safetensors>=0.4 tqdm>=4.60 pyyaml>=6 onnxruntime==1.23.2 onnx>=1.17 pytest pytest-timeout"
SITE=$CACHE/site-$(echo "$REQS" | sha256sum | cut -c1-12)
QEMU_CPU=${QEMU_CPU:-max}   # emulates the Armv8.x extensions, dot product included

bash scripts/venv.sh >/dev/null
PY=.venv/bin/python

missing=()
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing ${missing[*]} (apt)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >/dev/null
  else
    echo "arm64_check: needs ${missing[*]} (Debian packages); install them and rerun" >&2
    exit 2
  fi
fi

if [ ! -f "$ROOT/.complete" ]; then
  echo "== arm64 userland: debootstrap bookworm into $ROOT (once; cached)"
  rm -rf "$ROOT.tmp"
  mkdir -p "$CACHE"
  debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 bookworm "$ROOT.tmp" "$MIRROR" \
    > "$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  for deb in "$ROOT.tmp"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$ROOT.tmp"; done
  rm -rf "$ROOT"
  mv "$ROOT.tmp" "$ROOT"
  touch "$ROOT/.complete"   # last: an interrupted build is redone, never half used
fi
APY="$ROOT/usr/bin/python$PYVER"
[ -x "$APY" ] || { echo "arm64_check: $APY missing from the userland" >&2; exit 1; }

if [ ! -f "$SITE/.complete" ]; then
  echo "== aarch64 wheels into $SITE (once; cached)"
  rm -rf "$SITE.tmp"
  # shellcheck disable=SC2086
  $PY -m pip install -q --target "$SITE.tmp" --only-binary=:all: --implementation cp --python-version $PYVER \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64 \
    --platform manylinux2014_aarch64 --no-warn-conflicts $REQS > "$CACHE/pip.log" 2>&1 \
    || { grep -v WARNING "$CACHE/pip.log" | tail -20 >&2; exit 1; }
  rm -rf "$SITE"
  mv "$SITE.tmp" "$SITE"
  touch "$SITE/.complete"
fi

WORK=$(mktemp -d /tmp/edge-vila-arm64.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
echo "== x86 side: a tiny INT4 bundle and its greedy tokens ($WORK)"
$PY tests/emulated/make_reference.py "$WORK"

echo "== aarch64 side, under qemu-aarch64 -cpu $QEMU_CPU"
# the ops are compiled on first use by the program's $CC: here the cross compiler, run natively
# by the kernel (qemu-user passes an exec of a host binary through); -march for an Orin-class core
export CC=aarch64-linux-gnu-gcc EDGE_VILA_MARCH=armv8.2-a+dotprod
export XDG_CACHE_HOME=$WORK/xdg PYTHONPATH="$PWD:$SITE" PYTHONNOUSERSITE=1 EDGE_VILA_THREADS=2
export QEMU_LD_PREFIX=$ROOT QEMU_CPU
qemu-aarch64-static -L "$ROOT" "$APY" tests/emulated/check_arm64.py "$WORK"
echo "arm64_check OK in $(( $(date +%s) - START )) s (emulated: correctness only, not speed)"
