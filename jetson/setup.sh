#!/usr/bin/env bash
# On-device install of edge-vila on a Jetson Orin (JetPack 6.x).
#
#   bash jetson/setup.sh [--dry-run] [--venv DIR] [--ort-wheel FILE] [--no-apt] [--no-groups] [--force]
#
# - system packages: Python venv tools, TensorRT's Python binding (python3-libnvinfer, from
#   JetPack's apt repository), GStreamer + V4L2 tools for cameras;
# - a venv made with --system-site-packages, so the JetPack TensorRT module is importable
#   (TensorRT is not installable from PyPI for Jetson);
# - edge-vila with the ort, demo and jetson extras (jetson-stats' jtop needs its service:
#   installed system-wide with sudo, as its docs ask);
# - an onnxruntime-gpu wheel for Jetson if you pass one (--ort-wheel): PyPI's aarch64
#   onnxruntime is CPU-only;
# - the user joins the video and render groups (cameras, GPU without sudo).
# --dry-run prints every command instead of running it (tested in CI on a non-Jetson).
set -euo pipefail

DRY=0; VENV=".venv"; ORT_WHEEL=""; APT=1; GROUPS_=1; FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --venv) VENV="$2"; shift ;;
    --ort-wheel) ORT_WHEEL="$2"; shift ;;
    --no-apt) APT=0 ;;
    --no-groups) GROUPS_=0 ;;
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

run() {
  if [ "$DRY" = 1 ]; then printf '+ %s\n' "$*"; else "$@"; fi
}

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -r /etc/nv_tegra_release ]; then
  echo "L4T: $(head -n1 /etc/nv_tegra_release)"
elif [ "$FORCE" = 1 ] || [ "$DRY" = 1 ]; then
  echo "warning: /etc/nv_tegra_release not found: this is not a Jetson (continuing: --force/--dry-run)" >&2
else
  echo "setup.sh: /etc/nv_tegra_release not found: this script sets up a Jetson; on a workstation use scripts/venv.sh" >&2
  exit 1
fi

SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
if [ "$APT" = 1 ]; then
  run $SUDO apt-get update
  run $SUDO apt-get install -y python3-venv python3-pip python3-libnvinfer python3-libnvinfer-dev \
      gstreamer1.0-tools gstreamer1.0-plugins-good gstreamer1.0-plugins-bad v4l-utils
  run $SUDO pip3 install -U jetson-stats
  run $SUDO systemctl restart jtop.service
fi

run python3 -m venv --system-site-packages "$ROOT/$VENV"
run "$ROOT/$VENV/bin/pip" install -U pip
run "$ROOT/$VENV/bin/pip" install -e "$ROOT[ort,demo,jetson]"
if [ -n "$ORT_WHEEL" ]; then
  run "$ROOT/$VENV/bin/pip" uninstall -y onnxruntime
  run "$ROOT/$VENV/bin/pip" install "$ORT_WHEEL"
fi
run "$ROOT/$VENV/bin/python" -c "import tensorrt, edge_vila; print('tensorrt', tensorrt.__version__)"

if [ "$GROUPS_" = 1 ]; then
  run $SUDO usermod -aG video,render "${SUDO_USER:-${USER:-$(id -un)}}"
fi

cat <<EOF
next steps:
  export CUDA_MODULE_LOADING=LAZY           # smaller CUDA context (see edge-vila budget)
  $VENV/bin/edge-vila device                # JetPack / TensorRT / board
  $VENV/bin/edge-vila budget BUNDLE          # will it fit this board?
  $VENV/bin/edge-vila build BUNDLE           # TensorRT engines into BUNDLE/engines/
  $VENV/bin/pytest -m gpu tests/             # the checks that need this device
  $VENV/bin/edge-vila bench BUNDLE --backend tensorrt --out bench/
(log out and in again for the video/render groups to apply)
EOF
