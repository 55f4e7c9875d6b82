"""Builds `csrc/decode_attention.c`, our ONNX Runtime custom op for attention over the INT8
KV cache, into a shared library that `SessionOptions.register_custom_ops_library` loads.

Why our own op: ORT's CPU GroupQueryAttention spends 60-80 us per layer per decoded token
at 1024 cached positions (measured on a 2-core Zen 4), so decode at 1024 context ran at
0.67-0.75x of decode at 64. The op reads the INT8 keys as they are (the key scales are folded
into the query), keeps the key cache transposed so 16 positions score in one vector
instruction, and writes the new positions in place like GroupQueryAttention's shared buffer.

The library is compiled on first use with the system C compiler (`$CC`, else cc/gcc/clang)
for this CPU (`-march=native`) and cached per user (never in the bundle: a copied bundle may
land on another CPU), keyed by the source, the compiler and the CPU's flags. Without a
compiler the backend keeps GroupQueryAttention and says so in the log.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "decode_attention.c"
# no -ffast-math: with it GCC may link crtfastmath.o, which sets flush-to-zero for the whole process
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-Wall"]


def _cpu_key() -> str:
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _compiler() -> str | None:
    for cc in [os.environ.get("CC"), "cc", "gcc", "clang"]:
        if cc and shutil.which(cc):
            return cc
    return None


@functools.lru_cache(maxsize=None)
def _build_key(cc: str, flags: tuple[str, ...]) -> str:
    """Source + flags + compiler version + CPU flags, hashed; once per process (every backend
    load asks, and it runs the compiler and reads /proc/cpuinfo)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    return hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(flags), *version, _cpu_key()]).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-vila" / "ops"


def build_library(folder: Path | None = None, portable: bool = False) -> Path:
    """The compiled op library for this CPU (built and cached on first call). Raises
    RuntimeError naming the compiler and its output when it cannot be built. `portable`
    leaves out the AVX-512 kernels (the loops ARM and older x86 compile), for tests."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (set $CC, or install gcc) to build the attention op")
    flags = CFLAGS + (["-mno-avx512f"] if portable else [])
    folder = folder or cache_dir()
    lib = folder / f"libedge_vila_ops-{_build_key(cc, tuple(flags))}.so"
    if lib.is_file():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")  # atomic: a half-written .so is never loaded
    res = subprocess.run([cc, *flags, "-o", str(tmp), str(SOURCE), "-lm"], capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cc} could not build {SOURCE.name}:\n{res.stderr.strip()[-2000:]}")
    tmp.replace(lib)
    log.info("built the attention op %s", lib)
    return lib


def try_build_library() -> Path | None:
    """`build_library()`, or None (with a warning) when it cannot be built here."""
    try:
        return build_library()
    except (RuntimeError, OSError) as e:
        log.warning("keeping GroupQueryAttention: %s", e)
        return None


__all__ = ["build_library", "try_build_library", "cache_dir", "SOURCE"]
