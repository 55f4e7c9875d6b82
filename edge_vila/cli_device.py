"""Device verbs of `edge-vila`: build (TensorRT engines), bench, device, budget."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import InputError
from .options import add_runtime_args


def _budget_dims(path: str | None, model: str | None):
    """(dims, the byte widths the bundle stores: KV and embedding table; {} for --model)."""
    from .jetson.memory import ModelDims, bundle_byte_widths

    if model:
        try:
            return ModelDims.from_layout(model), {}
        except ValueError as e:
            raise InputError(f"--model: {e}") from None
    if not path:
        raise InputError("give a bundle folder or --model NAME (a released checkpoint, e.g. VILA1.5-3b)")
    from .bundle import read_manifest

    man = read_manifest(path, verify=False)
    return ModelDims.from_manifest(man), bundle_byte_widths(Path(path), man)


def cmd_budget(a: argparse.Namespace) -> int:
    from .jetson.detect import detect
    from .jetson.memory import BOARD_RAM_GB, BudgetOptions, budget

    dims, widths = _budget_dims(a.path, a.model)
    here = None if a.board else detect().board
    boards = [a.board] if a.board else ([here] if here else list(BOARD_RAM_GB))
    o = BudgetOptions(max_context=a.max_context, max_images=a.max_images, workspace_mb=a.workspace, **widths)
    results = [budget(dims, b, o) for b in boards]
    if a.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        print("\n\n".join(r.table() for r in results))
    return 0 if all(r.fits for r in results) or not a.board else 1


def cmd_device(a: argparse.Namespace) -> int:
    from .jetson.detect import detect
    from .jetson.stats import power_mode

    info = detect().to_dict()
    info["power_mode"] = power_mode()
    print(json.dumps(info, indent=2))
    return 0


def _target(a: argparse.Namespace) -> str:
    if a.target != "auto":
        return a.target
    import importlib.util

    return "tensorrt" if importlib.util.find_spec("tensorrt") is not None else "ort-cpu"


def cmd_build(a: argparse.Namespace) -> int:
    if _target(a) == "ort-cpu":
        from .backends.cpu_cache import build_cpu
        from .options import RuntimeOptions

        print(json.dumps(build_cpu(a.path, RuntimeOptions.from_args(a), rebuild=a.rebuild), indent=2))
        return 0
    from .bundle import read_manifest
    from .export.trt_build import BuildOptions, build_engines
    from .jetson.detect import detect
    from .jetson.memory import BudgetOptions, ModelDims, budget, bundle_byte_widths

    man = read_manifest(a.path)
    board = detect().board
    max_ctx = a.max_context or man.model.max_context
    if board:
        b = budget(ModelDims.from_manifest(man), board,
                   BudgetOptions(max_context=max_ctx, max_images=a.max_images, workspace_mb=a.workspace,
                                 **bundle_byte_widths(Path(a.path), man)))
        print(b.table())
        if not b.fits and not a.force:
            raise InputError(f"{a.path}: the engines at context {max_ctx} would not fit {board} "
                             f"({b.suggestion}); --force builds anyway")
    o = BuildOptions(precision=a.precision, max_context=a.max_context, max_prefill=a.max_prefill,
                     max_images=a.max_images, workspace_mb=a.workspace, timing_cache=a.timing_cache,
                     strongly_typed=a.strongly_typed, rebuild=a.rebuild)
    print(build_engines(a.path, o))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from . import load
    from .bench import BenchOptions, run_bench, summary, write_report

    from .options import RuntimeOptions

    pipe = load(a.path, RuntimeOptions.from_args(a))
    o = BenchOptions(contexts=tuple(int(c) for c in a.contexts.split(",")), decode_tokens=a.decode_tokens,
                     text_tokens=a.text_tokens, repeats=a.repeats, power=not a.no_power)
    res = run_bench(pipe, o)
    print(summary(res))
    if a.out:
        for f in write_report(res, Path(a.out)):
            print(f"wrote {f}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("build", help="build this device's private artifacts from a bundle: TensorRT engines (on "
                       "the Jetson) or the CPU fast graph and our compiled ops (ort-cpu)")
    s.add_argument("path")
    s.add_argument("--target", default="auto", choices=["auto", "tensorrt", "ort-cpu"],
                   help="what to build: tensorrt (engines/trt*/), ort-cpu (engines/ort-cpu/: the fast CPU graph and "
                        "our ops, for the runtime options given); auto: tensorrt where TensorRT is installed")
    add_runtime_args(s, skip=("backend", "max_context", "variant", "max_tiles", "max_pixels"))
    s.add_argument("--precision", default="auto", choices=["auto", "fp16", "int8", "fp32"],
                   help="engine precision: auto (INT8/INT4 as the bundle is quantized, else FP16), fp16, int8, fp32")
    s.add_argument("--max-context", type=int, default=None,
                   help="LLM positions the engines are built for (default: the bundle's, capped by what the "
                        "board's memory allows)")
    s.add_argument("--max-prefill", type=int, default=None, help="largest prefill chunk (default min(ctx, 1024))")
    s.add_argument("--max-images", type=int, default=1, help="images per prompt the vision engine's profile takes")
    s.add_argument("--workspace", type=int, default=2048, help="builder workspace, MB")
    s.add_argument("--timing-cache", default=None,
                   help="TensorRT timing cache to reuse across builds (default: one inside the engine folder)")
    s.add_argument("--strongly-typed", action="store_true",
                   help="build a strongly typed network (types from the ONNX, no precision flags)")
    s.add_argument("--rebuild", action="store_true", help="build again even if engines exist")
    s.add_argument("--force", action="store_true", help="build even if the memory budget says it will not fit")
    s.set_defaults(fn=cmd_build)

    s = sub.add_parser("bench", help="TTFT, prefill/decode tokens/s, vision latency, peak RSS (+ power on Jetson)")
    s.add_argument("path")
    add_runtime_args(s)
    s.add_argument("--contexts", default="64,512,1024", help="comma-separated context lengths to time decode at")
    s.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed per context")
    s.add_argument("--text-tokens", type=int, default=32, help="text tokens after the image in the TTFT prompt")
    s.add_argument("--repeats", type=int, default=5, help="repetitions per timing (the median is reported)")
    s.add_argument("--no-power", action="store_true", help="do not sample tegrastats power (Jetson)")
    s.add_argument("--out", default=None, help="folder for bench.json and bench.png")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("device", help="JetPack / L4T / TensorRT / board detection and power mode")
    s.set_defaults(fn=cmd_device)

    s = sub.add_parser("budget", help="will a bundle fit an 8/16/32/64 GB Orin? (memory budget)")
    s.add_argument("path", nargs="?")
    s.add_argument("--model", default=None,
                   help="a released checkpoint instead of a bundle: VILA1.5-3b, VILA1.5-13b, Llama-3-VILA1.5-8B")
    s.add_argument("--board", default=None, help="orin-nano-8gb, orin-nx-16gb, agx-orin-32gb, agx-orin-64gb, ...")
    s.add_argument("--max-context", type=int, default=4096, help="LLM positions to budget for")
    s.add_argument("--max-images", type=int, default=1, help="images per prompt to budget for")
    s.add_argument("--workspace", type=int, default=512, help="MB")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(fn=cmd_budget)
