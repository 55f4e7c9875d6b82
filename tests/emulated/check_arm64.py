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
from common import check_op_tests, check_tokens, check_vision, done, step  # noqa: E402


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
    check_op_tests(ROOT, "aarch64", "not avx")
    done(t)

    t = step("the x86-exported bundle: greedy tokens against the x86 run")
    got = check_tokens(work, "aarch64")
    done(t)

    t = step("the INT8 ViT forms against the host's float ViT features (ORT's aarch64 kernels)")
    vision = check_vision(work)
    done(t)
    (work / "arm64_result.json").write_text(json.dumps({"kernels": have, "modes": got, "vision": vision}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
