"""The INT8 ViT on ONNX Runtime's CPU kernels, accurate on every x86 CPU.

The bundle's vision.onnx is TensorRT's form: symmetric S8 weights and activations (Q/DQ). ORT
runs it fastest with U8 activations, but on x86 CPUs without VNNI its U8S8 GEMM multiplies
with VPMADDUBSW, which adds each pair of u8 x s8 products into a *saturating* int16: 2 x 255 x
127 = 64770 does not fit, and the features' cosine to fp32 fell to 0.94 (mean) on a Zen 3
(issue #25) while the S8 form, which avoids that path, kept 0.9997 at a quarter of the speed.
Stored as uint8 with zero point 128 the weights
dequantize to exactly the same values, and ORT takes its U8U8 path, which widens both inputs to
int16 before multiplying (VPMADDWD: nothing saturates). That is exact where 7-bit "reduced range"
weights are not (on the tiny VLM: features' cosine to fp32 0.9989 mean / 0.9981 min with 7 bits,
0.9995 / 0.9990 as U8U8, the same as U8S8 with VNNI). This module derives that graph from the
bundle's, once, into the CPU cache beside the fast LLM graph (verified by
the same record.json), and says which form a CPU gets by default.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import BundleConfig

log = logging.getLogger(__name__)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


@dataclass(frozen=True)
class VisionKey:
    form: str = "u8u8"


def x86_without_vnni(cpuinfo: str | None = None) -> bool:
    """Whether ORT's U8S8 GEMM here is the saturating pre-VNNI one (x86 without AVX-512 VNNI
    or AVX-VNNI). aarch64's kernels widen before they add: never."""
    from .native_ops import cpu_flags

    if platform.machine() not in ("x86_64", "AMD64", "i686"):
        return False
    return not any(f in cpu_flags(cpuinfo) for f in VNNI_FLAGS)


def resolve(option: str, exact: bool) -> str:
    """The form the CPU runs: `option` unless auto; auto is s8 when exact, u8u8 on x86 without
    VNNI, else u8. A forced u8 where U8S8 saturates is kept, with a warning."""
    if option == "u8" and x86_without_vnni():
        log.warning("vision_int8='u8' on an x86 CPU without VNNI: ORT's U8S8 GEMM saturates here "
                    "(image features' cosine to fp32 fell to 0.94 on a Zen 3); 'auto' picks u8u8")
    if option != "auto":
        return option
    if exact:
        return "s8"
    return "u8u8" if x86_without_vnni() else "u8"


def to_u8u8(model) -> int:
    """Rewrite, in place, every weight DequantizeLinear (int8 initializer input) to uint8 values
    q + 128 with zero point 128: the same dequantized weights exactly, so ORT's CPU kernels take
    their U8U8 path (inputs widened to int16 before VPMADDWD: nothing saturates) instead of U8S8.
    Returns how many weights; activation Q/DQ pairs are left as they are."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    used = {}
    for node in model.graph.node:
        for i in node.input:
            used[i] = used.get(i, 0) + 1
    done = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or node.input[1] not in inits:
            continue
        q_t = inits[node.input[0]]
        q = numpy_helper.to_array(q_t)
        if q.dtype != np.int8:
            continue
        if used[node.input[0]] != 1:
            raise ValueError(f"vision.onnx: weight {node.input[0]} feeds {used[node.input[0]]} nodes")
        scale = numpy_helper.to_array(inits[node.input[1]])
        if len(node.input) > 2 and node.input[2]:
            zp = numpy_helper.to_array(inits[node.input[2]])
            if np.any(zp != 0):
                raise ValueError(f"vision.onnx: weight {node.input[0]} is not symmetric (zero point {zp.ravel()[:4]})")
        q_t.CopyFrom(numpy_helper.from_array((q.astype(np.int16) + 128).astype(np.uint8), q_t.name))
        zp_name = f"{node.input[0]}__zp_u8"
        model.graph.initializer.append(numpy_helper.from_array(np.full(scale.shape, 128, np.uint8), zp_name))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = zp_name
        done += 1
    still = {i for n in model.graph.node for i in n.input}
    dead = [t for t in model.graph.initializer if t.name not in still]  # the int8 zero points replaced
    for t in dead:
        model.graph.initializer.remove(t)
    return done


def u8u8_graph(cfg: BundleConfig) -> Path:
    """The bundle's vision.onnx with uint8 weights (zero point 128), from the CPU cache (built on
    first use)."""
    from .cpu_cache import build_where_writable, cache_folders, find_verified, write_record

    key = VisionKey()
    src = cfg.manifest.files["vision.onnx"]
    sources = {"vision.onnx": src}
    folders = cache_folders(cfg, f"vision-{hashlib.sha256(src.encode()).hexdigest()[:16]}-{key.form}")
    found = find_verified(folders, sources, key, "vision graph")
    if found:
        return found / "vision.onnx"

    def build_in(folder: Path) -> Path:
        import onnx

        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        t0 = time.perf_counter()
        model = onnx.load(str(cfg.root / "vision.onnx"))
        n = to_u8u8(model)
        tmp = folder / f"vision.onnx.{os.getpid()}.tmp"
        onnx.save(model, str(tmp))
        tmp.replace(folder / "vision.onnx")
        write_record(folder, "ort-cpu vision graph, uint8 weights", key, sources, t0, weights_rewritten=n)
        log.info("derived the U8U8 INT8 ViT for this CPU (no VNNI) in %s", folder)
        return folder / "vision.onnx"

    return build_where_writable(folders, "vision graph", build_in)


__all__ = ["x86_without_vnni", "resolve", "to_u8u8", "u8u8_graph", "VisionKey"]
