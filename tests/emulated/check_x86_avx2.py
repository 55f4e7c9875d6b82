"""Emulated half of scripts/avx2_check.sh, run by qemu-x86_64 as an AVX2 CPU without AVX-512 or
VNNI (a Zen 3 / Haswell-to-Skylake workstation): our ops built for that CPU (-march=x86-64-v3)
carry and pick the AVX2 kernel and pass the numpy-reference tests; the host-exported bundle gives
the host's greedy tokens; and the INT8 ViT forms, now on ORT's pre-VNNI U8S8 GEMM (the one whose
int16 pair sums saturate), are held against the float ViT: U8U8 and S8 keep cosine >= 0.999, U8
is reported (on real pre-VNNI CPUs it is the one that drifts; issue #25 measured 0.906 min).

Emulation proves correctness, not speed. qemu-user passes the host's /proc/cpuinfo through, so
what reads it (the op tests' flag check, vision's "auto") sees the host: the CPU features that
count here are the ones the emulated CPUID reports (our kernels' and ORT's dispatch)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from common import check_op_tests, check_tokens, check_vision, done, step  # noqa: E402


def main() -> int:
    work = Path(sys.argv[1])
    from numpy._core._multiarray_umath import __cpu_features__ as cpu  # CPUID as the emulated CPU answers it

    assert cpu["AVX2"] and cpu["FMA3"] and not cpu["AVX512F"], (
        "expected an emulated AVX2 CPU without AVX-512 (qemu-x86_64 -cpu EPYC-Milan), got "
        f"{ {k: v for k, v in cpu.items() if k.startswith('AVX')} }")
    from edge_vila.backends import native_ops

    t = step("our ops, built for x86-64-v3: kernels")
    lib = native_ops.build_library()
    have, in_force = native_ops.kernels(lib), native_ops.kernel_in_force(lib)
    print(f"   {lib.name}: kernels {have}, in force {in_force} ({time.time() - t:.1f} s)")
    assert have == ["portable", "avx2"] and in_force == "avx2", (have, in_force)

    t = step("the ops against their numpy references (AVX2 and portable kernels, this CPU's builds)")
    check_op_tests(ROOT, "the emulated AVX2 CPU", "not kernels_follow_the_cpu")  # that one reads the host's cpuinfo
    done(t)

    t = step("the host-exported bundle: greedy tokens against the host run")
    got = check_tokens(work, "emulated AVX2")
    done(t)

    t = step("the INT8 ViT forms on ORT's pre-VNNI kernels against the host's float ViT features")
    vision = check_vision(work, must_hold=("u8u8", "edge", "s8"))
    done(t)
    (work / "avx2_result.json").write_text(json.dumps({"kernels": have, "modes": got, "vision": vision}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
