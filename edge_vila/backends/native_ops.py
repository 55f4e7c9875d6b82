"""Builds `csrc/`, our ONNX Runtime custom ops, into one shared library that
`SessionOptions.register_custom_ops_library` loads:

- `edge_vila.DecodeAttention` (decode_attention.c): attention over the INT8 KV cache;
- `edge_vila.Int4Linear` (int4_linear.c): the INT4 linears (AVX-512 VNNI, AVX2, NEON dot
  product), replacing MatMulNBits (which read the weights at ~27 GB/s of a ~70 GB/s host
  during decode);
- `edge_vila.Int8Linear` (int8_linear.c): the INT8 ViT's linears on x86 without VNNI, where
  ORT's fast U8S8 GEMM saturates (vision_cpu.py);
- a small thread pool both use (ops.c; ORT's own pool then runs with one thread).

Why our own attention op: ORT's CPU GroupQueryAttention spends 60-80 us per layer per decoded token
at 1024 cached positions (measured on a 2-core Zen 4), so decode at 1024 context ran at
0.67-0.75x of decode at 64. The op reads the INT8 keys as they are (the key scales are folded
into the query), keeps the key cache transposed so 16 positions score in one vector
instruction, and writes the new positions in place like GroupQueryAttention's shared buffer.

Each op has portable C loops and SIMD kernels (`KERNELS`); the library holds those the
compiler targets and runs the best one the CPU reports at run time (`kernels`, `use_kernel`).
Whether our ops or ORT's run by default is measured once per machine and model shape
(op_choice.py).

The library is compiled on first use with the system C compiler (`$CC`, else cc/gcc/clang)
for this CPU (`-march=native`, or `$EDGE_VILA_MARCH` for a cross compiler) and cached per user (never in the bundle: a copied bundle may
land on another CPU), keyed by the source, the compiler and the CPU's flags, and checked
against the sha256 recorded when it was built before every load. Without a
compiler the backend keeps GroupQueryAttention and MatMulNBits and says so in the log.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

from ..fsutil import atomic_write_text, cache_home, sha256_file

log = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"
# no -ffast-math: with it GCC may link crtfastmath.o, which sets flush-to-zero for the whole process.
# -z nodelete: ONNX Runtime dlclose()s a custom-op library when the last session that registered
# it is freed, but our pool's worker threads live on inside it; a later session mapped the library
# again (often at the same address, its pool's mutex and condition variable re-initialized under
# the sleeping workers), which crashed or hung the next parallel op (seen in CI). Never unloaded,
# the library keeps one pool for the life of the process.
CFLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-Wall",
          "-Wl,-z,nodelete"]


KERNELS = {"portable": 1, "avx2": 2, "avx512": 4, "neon": 8}  # the EV_* bits of ort_op.h
# build_library(isa=...): the x86 flags that leave kernels out (tests of the smaller CPUs' paths)
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"], "portable": ["-mno-avx512f", "-mno-avx2", "-mno-fma"]}


def _march() -> list[str]:
    return [f"-march={os.environ.get('EDGE_VILA_MARCH') or 'native'}"]


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The x86 CPU's feature flags from /proc/cpuinfo (or the text given); empty elsewhere."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    return set(next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "").partition(":")[2].split())


def _cpu_key() -> str:
    return platform.machine() + " ".join(sorted(cpu_flags()))


def _compiler() -> str | None:
    for cc in [os.environ.get("CC"), "cc", "gcc", "clang"]:
        if cc and shutil.which(cc):
            return cc
    return None


@functools.lru_cache(maxsize=None)
def _build_key(cc: str, flags: tuple[str, ...]) -> str:
    """Source + flags + the compiler's identity + CPU flags, hashed; once per process. The
    compiler is identified by its resolved path, size and mtime, not by running it: a load
    whose library is built runs no compiler at all."""
    exe = Path(shutil.which(cc) or cc).resolve()
    st = exe.stat()
    sources = [p.read_text() for p in _sources()] + [(CSRC / "ort_op.h").read_text()]
    ident = f"{exe} {st.st_size} {st.st_mtime_ns}"
    return hashlib.sha256("\n".join([*sources, " ".join(flags), ident, _cpu_key()]).encode()).hexdigest()[:16]


def _verified(lib: Path) -> bool:
    """The library matches the sha256 recorded beside it when it was built (a truncated or
    overwritten .so is rebuilt, never loaded)."""
    rec = lib.with_name(lib.name + ".sha256")
    if not (lib.is_file() and rec.is_file()):
        return False
    if rec.read_text().strip() == sha256_file(lib):
        return True
    log.warning("%s: changed since it was built (sha256 mismatch): rebuilding", lib)
    return False


def library_sha256(lib: Path) -> str:
    """The sha256 recorded when `lib` was built (build_library checked the file against it)."""
    rec = lib.with_name(lib.name + ".sha256")
    return rec.read_text().strip() if rec.is_file() else sha256_file(lib)


def _sources() -> list[Path]:
    return sorted(CSRC.glob("*.c"))


def cache_dir() -> Path:
    return cache_home() / "ops"


def build_library(folder: Path | None = None, isa: str = "native") -> Path:
    """The compiled op library for this CPU (built and cached on first call). Raises
    RuntimeError naming the compiler and its output when it cannot be built. `isa` "avx2" or
    "portable" leaves out the larger x86 kernels (what CPUs without them compile), for tests."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (set $CC, or install gcc) to build our ONNX Runtime ops")
    if isa != "native" and platform.machine() not in ("x86_64", "AMD64"):
        raise ValueError(f"isa={isa!r}: x86 builds only; elsewhere the native build is used")
    flags = _march() + CFLAGS + ISA_FLAGS[isa]
    folder = folder or cache_dir()
    lib = folder / f"libedge_vila_ops-{_build_key(cc, tuple(flags))}.so"
    if _verified(lib):
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")  # atomic: a half-written .so is never loaded
    res = subprocess.run([cc, *flags, "-o", str(tmp), *map(str, _sources()), "-lm", "-lpthread"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cc} could not build the ops in {CSRC}:\n{res.stderr.strip()[-2000:]}")
    digest = sha256_file(tmp)
    tmp.replace(lib)
    atomic_write_text(lib.with_name(lib.name + ".sha256"), digest + "\n")  # written last: a record means done
    log.info("built our ONNX Runtime ops %s", lib)
    return lib


def try_build_library() -> Path | None:
    """`build_library()`, or None (with a warning) when it cannot be built here."""
    try:
        return build_library()
    except (RuntimeError, OSError) as e:
        log.warning("keeping ONNX Runtime's GroupQueryAttention and MatMulNBits: %s", e)
        return None


@functools.lru_cache(maxsize=None)
def _cdll(lib: Path) -> ctypes.CDLL:
    """The library as ctypes sees it: dlopen of the same path gives the same loaded copy ORT
    uses, so settings made here (threads) reach the ops inside a session."""
    dll = ctypes.CDLL(str(lib))
    dll.edge_vila_set_threads.argtypes = [ctypes.c_int]
    dll.edge_vila_use_kernel.argtypes = [ctypes.c_int]
    f = dll.edge_vila_int4_linear
    f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    P = ctypes.c_void_p
    dll.edge_vila_int8_linear.argtypes = [P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, P, P, P, P, P,
                                          ctypes.c_int, ctypes.c_int]
    return dll


def set_threads(lib: Path, n: int | None) -> int:
    """Threads our ops use (the caller's included); None or 0: $EDGE_VILA_THREADS, else the
    CPUs this process may run on. Returns the count in force."""
    return int(_cdll(lib).edge_vila_set_threads(int(n or 0)))


def kernels(lib: Path) -> list[str]:
    """The kernels `lib` holds that this CPU runs (KERNELS' names, "portable" always)."""
    mask = int(_cdll(lib).edge_vila_kernels())
    return [name for name, bit in KERNELS.items() if mask & bit]


def kernel_in_force(lib: Path) -> str:
    """The kernel both ops run now: the best of `kernels(lib)` unless `use_kernel` forced one."""
    bit = int(_cdll(lib).edge_vila_kernel_in_force())
    return next(n for n, b in KERNELS.items() if b == bit)


def use_kernel(lib: Path, name: str | None) -> str:
    """Make both ops run kernel `name` (None: the best available again), process-wide; returns
    the kernel in force. ValueError when `lib` on this CPU has no such kernel."""
    bit = KERNELS.get(name, -2) if name else 0
    got = int(_cdll(lib).edge_vila_use_kernel(bit)) if bit >= 0 else -1
    if got < 0:
        raise ValueError(f"kernel {name!r}: not available here (have {kernels(lib)})")
    return next(n for n, b in KERNELS.items() if b == got)


def int4_linear(lib: Path, x, packed: tuple, K: int, N: int, block: int, bias=None, swiglu: bool = False,
                skip=None, norm_weight=None, epsilon: float = 1e-5, kernel: str | None = None):
    """y = x W^T through the op's kernel without ONNX Runtime (tests, benchmarks). `packed` is
    `ort_fast.pack_int4_tiles`'s (W, scales float32 or float16, zeros or None: all 8); `swiglu`: x is [..., 2K] = gate | up and the
    linear reads silu(gate) * up; `norm_weight`: it reads RMSNorm(x + skip) * norm_weight, and
    (y, x + skip) is returned. `kernel`: one of `kernels(lib)` (None: the one in force)."""
    import numpy as np

    def arr(a):
        return None if a is None else np.ascontiguousarray(a, np.float32)

    x, b, skip, norm_weight = arr(x), arr(bias), arr(skip), arr(norm_weight)
    w, sc, zp = (None if a is None else np.ascontiguousarray(a) for a in packed)
    if sc.dtype not in (np.float32, np.float16):
        raise ValueError(f"int4_linear: scales are {sc.dtype}, expected float32 or float16")
    if x.shape[-1] != K * (2 if swiglu else 1):
        raise ValueError(f"int4_linear: x has {x.shape[-1]} channels, expected {K * (2 if swiglu else 1)}")
    if skip is not None and (skip.shape != x.shape or norm_weight is None):
        raise ValueError("int4_linear: skip needs x's shape and a norm_weight")
    M = int(np.prod(x.shape[:-1]))
    y = np.empty((*x.shape[:-1], N), np.float32)
    total = np.empty_like(x) if norm_weight is not None else None
    ptr = lambda a: None if a is None else a.ctypes.data
    rc = _cdll(lib).edge_vila_int4_linear(ptr(x), M, K, N, block, ptr(w), ptr(sc), ptr(zp), ptr(b), ptr(y), int(swiglu),
                                          ptr(skip), ptr(norm_weight), float(epsilon), ptr(total),
                                          KERNELS.get(kernel, -1) if kernel else 0, int(sc.dtype == np.float16))
    if rc:
        raise ValueError({-1: f"int4_linear: bad arguments (K={K}, N={N}, block={block})",
                          -3: f"int4_linear: kernel {kernel!r} not available here (have {kernels(lib)})"}
                         .get(rc, "int4_linear: out of memory"))
    return y if norm_weight is None else (y, total)


def int8_linear(lib: Path, x, packed: tuple, K: int, N: int, bias=None, gelu: bool = False,
                kernel: str | None = None):
    """y = act(x W + bias) through Int8Linear's kernel without ONNX Runtime (tests, benchmarks).
    `packed` is `vision_cpu.pack_int8_panels`'s (W, scales, weight sums); `gelu`: the tanh form.
    `kernel`: one of `kernels(lib)` (None: the one in force; every x86 one runs the AVX2 loops)."""
    import numpy as np

    x = np.ascontiguousarray(x, np.float32)
    b = None if bias is None else np.ascontiguousarray(bias, np.float32)
    w, sc, sums = (np.ascontiguousarray(a) for a in packed)
    panels, Kp = -(-N // 16), -(-K // 4) * 4
    if w.dtype != np.int8 or w.shape != (panels, Kp * 16) or sc.dtype != np.float32 or sc.shape != (panels * 16,) \
            or sums.dtype != np.int32 or sums.shape != (panels * 16,):
        raise ValueError(f"int8_linear: packed weights do not fit K={K} N={N} (W {w.dtype} {w.shape}, scales "
                         f"{sc.dtype} {sc.shape}, sums {sums.dtype} {sums.shape})")
    if x.shape[-1] != K or (b is not None and b.shape != (N,)):
        raise ValueError(f"int8_linear: x has {x.shape[-1]} channels (K={K}), bias {None if b is None else b.shape}")
    M = int(np.prod(x.shape[:-1]))
    y = np.empty((*x.shape[:-1], N), np.float32)
    ptr = lambda a: None if a is None else a.ctypes.data
    rc = _cdll(lib).edge_vila_int8_linear(ptr(x), M, K, N, ptr(w), ptr(sc), ptr(sums), ptr(b), ptr(y), int(gelu),
                                          KERNELS.get(kernel, -1) if kernel else 0)
    if rc:
        raise ValueError({-1: f"int8_linear: bad arguments (K={K}, N={N})",
                          -3: f"int8_linear: kernel {kernel!r} not available here (have {kernels(lib)})"}
                         .get(rc, "int8_linear: out of memory"))
    return y


__all__ = ["cpu_flags", "library_sha256", "build_library", "try_build_library", "cache_dir", "CSRC", "set_threads", "kernels", "use_kernel",
           "kernel_in_force", "int4_linear", "int8_linear", "KERNELS"]
