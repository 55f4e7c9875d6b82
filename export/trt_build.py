"""Build TensorRT engines from a bundle's ONNX, on the device (`edge-vila build`).

Written against TensorRT 10's Python API (JetPack 6.1/6.2). What is decided here and
tested on the CPU: the engine key and folder, the optimization profiles (jetson/engines.py),
the precision flags and which ONNX to build. What needs TensorRT, and so is verified
only on a device (`pytest -m gpu`): parsing, building and serializing.

- Explicit quantization: the bundle's Q/DQ (INT8 ViT) and block DequantizeLinear (INT4
  weight-only LLM) say where low precision goes; the builder only enables the types.
  `--precision auto` = FP16 + INT8 flags (weakly typed: the remaining layers may run in
  FP16); `--strongly-typed` builds a strongly typed network instead, where the ONNX
  types decide (our ONNX activations are float32, so that is slower but exact).
- One LLM engine with two profiles, prefill (0) and decode (1), used by one context.
- The timing cache is loaded and saved next to the engines, so rebuilds are fast.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from edge_vila.bundle import Manifest, read_manifest
from edge_vila.errors import InputError
from edge_vila.fsutil import atomic_write_bytes
from edge_vila.jetson.detect import detect, precisions_for_tensorrt
from edge_vila.jetson.engines import (LLM_PLAN, PROJECTOR_PLAN, TIMING_CACHE, VISION_PLAN, EngineKey, EngineMismatch,
                                      Profile, check_engines,
                                      engine_dir, llm_profiles, projector_profile, vision_profile, write_key)

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp16", "int8", "fp32")


@dataclass
class BuildOptions:
    precision: str = "auto"
    max_context: int | None = None      # default: the bundle's exported max context
    max_prefill: int | None = None      # default: min(max_context, 1024)
    max_images: int = 1
    workspace_mb: int = 2048
    timing_cache: Path | None = None    # default: engines/<key>/timing.cache
    strongly_typed: bool = False
    rebuild: bool = False


def builder_flags(precision: str, man: Manifest, trt_version: str) -> list[str]:
    """Names of `trt.BuilderFlag`s for this bundle. Raises when the bundle needs more than the TRT has."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r} unknown (expected one of {', '.join(PRECISIONS)})")
    p = precisions_for_tensorrt(trt_version)
    quant = man.quant
    if quant.get("llm") == "awq-w4" and not p.int4_weights:
        raise InputError(f"this bundle's LLM is INT4 (block DequantizeLinear), which TensorRT {trt_version} cannot "
                         "build (needs TensorRT >= 10, JetPack >= 6.1); export with --llm-quant fp16")
    has_int8 = quant.get("vision") == "int8" or quant.get("llm") == "awq-w4"
    if precision == "fp32":
        return []
    flags = ["FP16"]
    if precision in ("auto", "int8") and has_int8:
        flags.append("INT8")
    return flags


def plan_key(bundle: Path, man: Manifest, trt_version: str, sm: str, jetpack: str | None, o: BuildOptions) -> EngineKey:
    max_ctx = o.max_context or man.model.max_context
    return EngineKey(tensorrt=trt_version, sm=sm, jetpack=jetpack,
                     onnx_sha256={k: v for k, v in man.files.items() if k.endswith((".onnx", ".onnx.data"))},
                     precision=o.precision, max_context=max_ctx, max_prefill=o.max_prefill or min(max_ctx, 1024),
                     max_images=o.max_images, strongly_typed=o.strongly_typed)


def _build_one(trt, onnx_path: Path, profiles: list[Profile], flags: list[str], o: BuildOptions, cache_path: Path,
               out: Path) -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    net_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if o.strongly_typed else 0
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"{onnx_path}: TensorRT's ONNX parser rejected it: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, o.workspace_mb << 20)
    if not o.strongly_typed:
        for f in flags:
            config.set_flag(getattr(trt.BuilderFlag, f))
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.shapes.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    t0 = time.time()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise InputError(f"{onnx_path}: TensorRT build failed (see the log above)")
    atomic_write_bytes(out, bytes(plan))
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    log.info("built %s in %.0f s (%.1f MB)", out.name, time.time() - t0, out.stat().st_size / 1e6)


def build_engines(bundle: str | Path, o: BuildOptions | None = None) -> Path:
    """Build (or reuse) engines for this device. Returns the engine folder."""
    o = o or BuildOptions()
    bundle = Path(bundle)
    man = read_manifest(bundle)
    try:
        import tensorrt as trt
    except ImportError as e:
        raise InputError(f"TensorRT's Python module is not importable ({e}): `edge-vila build` runs on the "
                         "device (on Jetson: create the venv with --system-site-packages, see jetson/setup.sh)") from None
    info = detect()
    key = plan_key(bundle, man, trt.__version__, info.sm or _cuda_sm(), info.jetpack, o)
    flags = builder_flags(o.precision, man, trt.__version__)
    folder = engine_dir(bundle, key)
    if folder.is_dir() and not o.rebuild:
        try:
            check_engines(folder, key)
            log.info("engines exist in %s and match their record (use --rebuild to build again)", folder)
            return folder
        except EngineMismatch as e:  # an interrupted, older or corrupted build: never used, built again
            log.warning("rebuilding: %s", e)
    folder.mkdir(parents=True, exist_ok=True)
    cache_path = Path(o.timing_cache) if o.timing_cache else folder / TIMING_CACHE
    if "vision.onnx" in man.files:
        _build_one(trt, bundle / "vision.onnx", [vision_profile(man, o.max_images)], flags, o, cache_path,
                   folder / VISION_PLAN)
    if "projector.onnx" in man.files:  # dynamic_s2: the projector after the host's S2 merge
        _build_one(trt, bundle / "projector.onnx", [projector_profile(man, o.max_images)], flags, o, cache_path,
                   folder / PROJECTOR_PLAN)
    _build_one(trt, bundle / "llm.onnx", llm_profiles(man, key.max_context, key.max_prefill), flags, o, cache_path,
               folder / LLM_PLAN)
    write_key(folder, key)  # last: a folder without a key is an interrupted build
    return folder


def _cuda_sm() -> str:
    """Compute capability of GPU 0 via cuda-python (used off-Jetson, e.g. a workstation GPU)."""
    from edge_vila.backends.cuda_mem import device_sm

    return device_sm()


__all__ = ["BuildOptions", "build_engines", "builder_flags", "plan_key", "PRECISIONS"]
