"""What the fast CPU graph's default-op timing (edge_vila/backends/op_choice.py) measures on
this machine, per kernel of ours, at SmolLM2-135M's and VILA1.5-3B's LLM decode shapes:

    python benchmarks/op_choice.py [--out runs/bench/op_choice.json]

Prints µs per decode layer for each pair (our INT4 linear or MatMulNBits, with our attention or
GroupQueryAttention) and the pair chosen. ORT's kernels are this CPU's whichever of ours is
forced: an `avx2` row on an AVX-512 machine is not an AVX2-only CPU's figure.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHAPES = {  # hidden, intermediate, heads, kv heads, head_dim, block, positions, threads, layers
    "SmolLM2-135M": (576, 1536, 9, 3, 64, 128, 1024, 0, 30),
    "VILA1.5-3B LLM": (2560, 6912, 20, 20, 128, 128, 1024, 0, 32),
}


def main() -> None:
    import os

    sys.path.insert(0, str(Path(__file__).parent))
    from decode_speed import machine
    from edge_vila.backends import native_ops, op_choice

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/bench/op_choice.json"))
    a = ap.parse_args()
    lib = native_ops.build_library()
    threads = int(os.environ.get("EDGE_VILA_THREADS") or 0) or len(os.sched_getaffinity(0))
    res = {"machine": machine(), "rows": []}
    print("| shape | kernel | ours + ours | ours + GQA | MatMulNBits + ours | MatMulNBits + GQA | chosen |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, dims in SHAPES.items():
        shape = op_choice.Shape(*dims[:7], threads, dims[8])
        for kernel in reversed(native_ops.kernels(lib)):
            if kernel == "portable":
                continue
            native_ops.use_kernel(lib, kernel)
            c = op_choice.measure(lib, shape)
            u = c.us
            print(f"| {name} | {kernel} | {u['layer_edge_edge']:.0f} | {u['layer_edge_gqa']:.0f} | "
                  f"{u['layer_nbits_edge']:.0f} | {u['layer_nbits_gqa']:.0f} | {c.matmul} + {c.attention} |",
                  flush=True)
            res["rows"].append({"shape": name, **c.__dict__})
    native_ops.use_kernel(lib, None)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
