"""aarch64 half of scripts/arm64_check.sh, run under qemu-aarch64 with only the device runtime's
dependencies installed (no torch, no transformers): the package imports, our ops build with the
aarch64 compiler and pass the same numpy-reference tests as on x86, the x86-exported bundle
gives the x86 run's greedy tokens, and every INT8 ViT form keeps its features' cosine to the
float ViT >= 0.999 on ORT's aarch64 kernels."""
from __future__ import annotations

import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from common import check_vision, run_modes  # noqa: E402


def step(msg: str) -> float:
    print(f"-- {msg}", flush=True)
    return time.time()


def main() -> int:
    work = Path(sys.argv[1])
    assert platform.machine() == "aarch64", f"expected to run as aarch64 (under qemu), got {platform.machine()}"
    t = step(f"python {platform.python_version()} on {platform.machine()}: import edge_vila without torch")
    for mod in ("torch", "transformers"):
        assert importlib.util.find_spec(mod) is None, f"{mod} is installed in the aarch64 runtime: the check is void"
    import edge_vila  # noqa: F401
    from edge_vila.backends import native_ops
    bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx")]
    assert not bad, f"import edge_vila pulled in {bad}"
    print(f"   ok ({time.time() - t:.1f} s)")

    t = step("our ops, built by the aarch64 compiler: kernels")
    lib = native_ops.build_library()
    have = native_ops.kernels(lib)
    print(f"   {lib.name}: kernels {have}, in force {native_ops.kernel_in_force(lib)} ({time.time() - t:.1f} s)")
    assert "neon" in have, f"no NEON dot-product kernel in the aarch64 build (have {have})"

    t = step("the ops against their numpy references (the x86 tests, every aarch64 kernel)")
    tests = ["tests/test_int4_linear.py", "tests/test_decode_attention.py::test_matches_reference_over_prefill_decode_and_rewind",
             "tests/test_decode_attention.py::test_long_context_decode_split_over_positions"]
    import os

    import pytest
    os.chdir(ROOT)  # in this process: without binfmt_misc an aarch64 child could not be exec'd
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "--noconftest", "-x", *tests, "-k", "not avx"])
    assert rc == 0, f"op tests failed on aarch64 (pytest rc {rc})"
    print(f"   ok ({time.time() - t:.0f} s)")

    t = step("the x86-exported bundle: greedy tokens against the x86 run")
    ref = json.loads((work / "reference.json").read_text())
    got = run_modes(work / "bundle")
    for mode, want in ref["modes"].items():
        assert got[mode]["tokens"] == want["tokens"], (
            f"mode {mode}: aarch64 tokens {got[mode]['tokens']} != x86 {want['tokens']} "
            f"(texts {got[mode]['texts']} vs {want['texts']})")
        print(f"   {mode}: {got[mode]['variant']} graph, KV {got[mode]['kv_cache']}, matmul {got[mode]['matmul']}, "
              f"attention {got[mode]['attention']}: {sum(map(len, want['tokens']))} tokens equal to x86's")
    print(f"   ok ({time.time() - t:.0f} s)")
    t = step("the INT8 ViT forms against the host's float ViT features (ORT's aarch64 kernels)")
    vision = check_vision(work)
    print(f"   ok ({time.time() - t:.0f} s)")
    (work / "arm64_result.json").write_text(json.dumps({"kernels": have, "modes": got, "vision": vision}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
