"""Which Jetson is this, and what can its software stack run?

Sources, in order of trust: `/etc/nv_tegra_release` (the L4T release the board was
flashed with), `dpkg-query` (the nvidia-jetpack and TensorRT packages installed),
the `tensorrt` Python module, `/proc/device-tree/model` (the board name). Every
parser takes text, so each is tested on recorded strings; only `detect()` touches
the filesystem. Off-Jetson, `detect()` returns an info with `is_jetson=False`.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

# L4T release -> JetPack (NVIDIA's JetPack archive). Longest prefix wins.
L4T_TO_JETPACK = {
    "36.4.4": "6.2.1", "36.4.3": "6.2", "36.4": "6.1", "36.3": "6.0", "36.2": "6.0 DP",
    "35.6": "5.1.4", "35.5": "5.1.3", "35.4": "5.1.2", "35.3": "5.1.1", "35.2": "5.1", "35.1": "5.0.2",
}
# JetPack -> the TensorRT it ships
JETPACK_TO_TENSORRT = {
    "6.2.1": "10.3", "6.2": "10.3", "6.1": "10.3", "6.0": "8.6", "6.0 DP": "8.6",
    "5.1.4": "8.5", "5.1.3": "8.5", "5.1.2": "8.5", "5.1.1": "8.5", "5.1": "8.5", "5.0.2": "8.4",
}


@dataclass(frozen=True)
class Precisions:
    fp16: bool
    int8_qdq: bool      # explicit INT8 quantization from Q/DQ nodes
    int4_weights: bool  # INT4 block-DequantizeLinear weight-only (TensorRT >= 10)
    fp8: bool           # Orin (sm87) has no FP8 tensor cores, whatever the TensorRT version


def precisions_for_tensorrt(trt: str | None) -> Precisions:
    """What a bundle may use on this TensorRT (Orin GPU assumed: sm87)."""
    major = int(trt.split(".")[0]) if trt else 0
    return Precisions(fp16=major >= 8, int8_qdq=major >= 8, int4_weights=major >= 10, fp8=False)


def parse_nv_tegra_release(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.3, GCID: ...' -> '36.4.3'."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def jetpack_for_l4t(l4t: str | None) -> str | None:
    if not l4t:
        return None
    parts = l4t.split(".")
    for n in range(len(parts), 1, -1):
        key = ".".join(parts[:n])
        if key in L4T_TO_JETPACK:
            return L4T_TO_JETPACK[key]
    return None


def parse_dpkg(text: str) -> dict[str, str]:
    """Lines of `dpkg-query -W -f='${Package} ${Version}\\n' ...` -> {package: version}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    return out


def tensorrt_from_dpkg(pkgs: dict[str, str]) -> str | None:
    """'10.3.0.30-1+cuda12.5' -> '10.3' (major.minor is what engines are tied to, with sm)."""
    for name in ("tensorrt", "libnvinfer10", "libnvinfer8", "python3-libnvinfer"):
        if name in pkgs:
            m = re.match(r"(\d+)\.(\d+)", pkgs[name])
            if m:
                return f"{m.group(1)}.{m.group(2)}"
    return None


def jetpack_from_dpkg(pkgs: dict[str, str]) -> str | None:
    v = pkgs.get("nvidia-jetpack")
    m = re.match(r"(\d+\.\d+(?:\.\d+)?)", v) if v else None
    return m.group(1) if m else None


def board_from_model(model: str | None, ram_gb: float | None = None) -> str | None:
    """'NVIDIA Jetson AGX Orin Developer Kit' + 61.4 GB -> 'agx-orin-64gb'."""
    if not model:
        return None
    m = model.lower()
    if "orin" not in m:
        return None
    kind = "agx-orin" if "agx" in m else "orin-nx" if " nx" in m else "orin-nano" if "nano" in m else "orin"
    if ram_gb is None:
        return kind
    sizes = {"agx-orin": (32, 64), "orin-nx": (8, 16), "orin-nano": (4, 8), "orin": (8, 16, 32, 64)}[kind]
    nominal = min(sizes, key=lambda s: abs(s - ram_gb))  # the kernel reports a bit less than nominal
    return f"{kind}-{nominal}gb"


@dataclass
class JetsonInfo:
    is_jetson: bool
    l4t: str | None = None
    jetpack: str | None = None
    tensorrt: str | None = None
    model: str | None = None
    board: str | None = None
    sm: str | None = None
    ram_gb: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def precisions(self) -> Precisions:
        return precisions_for_tensorrt(self.tensorrt)

    def to_dict(self) -> dict:
        return {**asdict(self), "precisions": asdict(self.precisions)}


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def _ram_gb() -> float | None:
    text = _read("/proc/meminfo") or ""
    m = re.search(r"MemTotal:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 ** 2 if m else None


def detect(root: str = "/") -> JetsonInfo:
    """Inspect this machine. Nothing here needs root or a GPU."""
    rel = _read(str(Path(root) / "etc/nv_tegra_release"))
    model = _read(str(Path(root) / "proc/device-tree/model"))
    info = JetsonInfo(is_jetson=rel is not None, model=model, ram_gb=_ram_gb())
    if not info.is_jetson:
        info.notes.append("no /etc/nv_tegra_release: not a Jetson (L4T) system")
    info.l4t = parse_nv_tegra_release(rel or "")
    pkgs: dict[str, str] = {}
    if shutil.which("dpkg-query"):
        r = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Version}\\n", "nvidia-jetpack", "tensorrt",
                            "libnvinfer10", "libnvinfer8"], capture_output=True, text=True)
        pkgs = parse_dpkg(r.stdout)
    info.jetpack = jetpack_from_dpkg(pkgs) or jetpack_for_l4t(info.l4t)
    info.tensorrt = tensorrt_from_dpkg(pkgs)
    if info.tensorrt is None:
        try:
            import tensorrt  # noqa: F401  (the module's version wins over the JetPack table)
            info.tensorrt = ".".join(tensorrt.__version__.split(".")[:2])
        except ImportError:
            info.tensorrt = JETPACK_TO_TENSORRT.get(info.jetpack or "")
            if info.is_jetson:
                info.notes.append("tensorrt Python module not importable (create the venv with "
                                  "--system-site-packages: see jetson/setup.sh)")
    info.board = board_from_model(model, info.ram_gb)
    if info.board:
        info.sm = "sm87"  # every Orin module's GPU is compute capability 8.7
    return info


__all__ = ["JetsonInfo", "Precisions", "detect", "parse_nv_tegra_release", "jetpack_for_l4t", "parse_dpkg",
           "tensorrt_from_dpkg", "jetpack_from_dpkg", "board_from_model", "precisions_for_tensorrt"]
