"""Vision encoder on the CPU (issue #5): fp32 vs the bundle's INT8 (S8 Q/DQ, TensorRT's form)
vs INT8 with U8 activations (what the ORT backend runs on a CPU with VNNI) vs U8U8 (uint8
weights) vs edge (our Int8Linear op: what it runs on x86 without VNNI, AVX2), latency and cosine
to fp32. The figures are this machine's kernels: U8U8's and edge's point is a CPU without VNNI,
where U8S8 saturates. Each form runs in the session options the backend gives it (edge: our op
library, ORT's threads not spinning); fp32 and the ORT forms with ORT's defaults.

    python benchmarks/vision_speed.py [--out runs/bench/vision]

The ViT is random-weight at SigLIP-B/16's shape (224 px, 16 px patches, 768 wide, 12 layers,
12 heads, MLP 3072) — speed does not depend on weight values; its INT8 calibration runs on
synthetic scenes and the cosine is measured on other synthetic scenes and scikit-image photos.
A random ViT has no trained outliers, so its INT8 cosine is an optimistic proxy; the trained
tiny recipe's ViT is measured too (`--bundle-int8/--bundle-fp32`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def _sess(path: Path | bytes, s8: bool, ops: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if s8:
        so.add_session_config_entry("session.qdqisint8allowed", "1")
    if ops:
        so.register_custom_ops_library(str(ops))
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=["CPUExecutionProvider"])


def _times(sessions: dict, x, rounds: int = 3, runs: int = 5) -> dict:
    """Per round, each form in turn: one untimed run, then `runs` timed ones (a block, not one
    run each: the ORT sessions' threads spin on after a run and slowed whichever session ran
    next), the forms alternating round by round since this kind of host drifts by +-20%. Per
    form the median, min and max of its timed runs, in ms."""
    ts = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            s.run(None, {"pixels": x})
            for _ in range(runs):
                t0 = time.perf_counter()
                s.run(None, {"pixels": x})
                ts[k].append(1000 * (time.perf_counter() - t0))
    return {k: (statistics.median(v), min(v), max(v)) for k, v in ts.items()}


def compare(fp32: Path, int8: Path, images: list) -> dict:
    from edge_vila.bundle import load_bundle_config
    from edge_vila.preprocess import preprocess_images

    cfg = load_bundle_config(int8)
    x = preprocess_images(images, cfg.preprocess)
    one = x[:1]
    import onnx

    from edge_vila.backends import native_ops
    from edge_vila.backends.vision_cpu import to_edge_int8, to_u8u8

    u8u8 = onnx.load(str(int8 / "vision.onnx"))
    to_u8u8(u8u8)  # what the backend derives on x86 without VNNI (backends/vision_cpu.py)
    edge = onnx.load(str(int8 / "vision.onnx"))
    to_edge_int8(edge)
    lib = native_ops.build_library()
    native_ops.set_threads(lib, 0)
    s_fp, s_s8, s_u8 = _sess(fp32 / "vision.onnx", False), _sess(int8 / "vision.onnx", True), \
        _sess(int8 / "vision.onnx", False)
    s_u8u8 = _sess(u8u8.SerializeToString(), False)
    s_edge = _sess(edge.SerializeToString(), False, lib)
    ref = s_fp.run(None, {"pixels": x})[0]
    out = {}
    sessions = {"fp32": s_fp, "int8_s8": s_s8, "int8_u8": s_u8, "int8_u8u8": s_u8u8, "int8_edge": s_edge}
    times = _times(sessions, one)
    for name, s in sessions.items():
        o = s.run(None, {"pixels": x})[0]
        cos = (o * ref).sum(-1) / np.linalg.norm(o, axis=-1) / np.linalg.norm(ref, axis=-1)
        med, lo, hi = times[name]
        out[name] = {"ms_per_image": med, "ms_min": lo, "ms_max": hi, "cosine_mean": float(cos.mean()),
                     "cosine_min": float(cos.min())}
    for k in ("int8_s8", "int8_u8", "int8_u8u8", "int8_edge"):
        out[k]["speedup_vs_fp32"] = out["fp32"]["ms_per_image"] / out[k]["ms_per_image"]
    return out


def main() -> None:
    import skimage

    from edge_vila.export.bundle import ExportOptions, export_bundle
    from edge_vila.testing import make_tiny_checkpoint
    from edge_vila.synthetic.world import random_scene, rng_for

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/bench/vision"))
    ap.add_argument("--bundle-int8", type=Path, default=None)
    ap.add_argument("--bundle-fp32", type=Path, default=None)
    a = ap.parse_args()
    work = a.out / "work"
    photos = [str(Path(skimage.__file__).parent / "data" / f"{n}.png") for n in ("astronaut", "chelsea", "coffee",
                                                                                  "ihc", "motorcycle_left")]
    res = {}
    if not (work / "int8" / "manifest.json").exists():
        ck = make_tiny_checkpoint(work / "ckpt", image_size=224, patch_size=16, vision_hidden=768, vision_layers=12,
                                  vision_heads=12, vision_intermediate=3072, select_feature="patch")
        export_bundle(ck, work / "fp32", ExportOptions(llm_quant="fp32", vision_quant="fp32", report=False))
        export_bundle(ck, work / "int8", ExportOptions(llm_quant="fp32", vision_quant="int8", report=False))
    scenes = [random_scene(rng_for(123, k)).render(224) for k in range(8)]
    res["siglip_b16_shape_random"] = compare(work / "fp32", work / "int8", scenes + photos)
    if a.bundle_int8 and a.bundle_fp32:
        size = json.loads((a.bundle_int8 / "manifest.json").read_text())["preprocess"]["height"]
        res["tiny_recipe_trained"] = compare(a.bundle_fp32, a.bundle_int8,
                                             [random_scene(rng_for(123, k)).render(size) for k in range(16)])
    for name, r in res.items():
        for k, v in r.items():
            print(f"{name:26s} {k:9s} {v['ms_per_image']:8.2f} ms/image ({v['ms_min']:.1f}-{v['ms_max']:.1f})  cosine mean {v['cosine_mean']:.5f} "
                  f"min {v['cosine_min']:.5f}" + (f"  x{v['speedup_vs_fp32']:.2f} vs fp32" if "speedup_vs_fp32" in v
                                                  else ""))
    import platform

    from edge_vila.backends.native_ops import cpu_flags

    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    res["machine"] = {"cpu": model, "cores": os.cpu_count(), "onnxruntime": ort.__version__,
                      "flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "fma", "f16c", "amx")))}
    (a.out / "vision.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
