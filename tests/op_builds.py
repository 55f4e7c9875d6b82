"""The op library builds our op tests share (test_int4_linear.py, test_int8_linear.py): the
native build, and on x86 the builds without AVX-512 and without AVX2, so every kernel this
machine can run is tested from each build that carries it. A plain module, not conftest.py:
the emulated checks run these test files with --noconftest."""
from __future__ import annotations

import platform

import pytest

from edge_vila.backends.native_ops import build_library, kernels

X86 = platform.machine() in ("x86_64", "AMD64")


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    out = {"native": build_library(tmp_path_factory.mktemp("ops"))}
    if X86:
        for isa in ("avx2", "portable"):
            out[isa] = build_library(tmp_path_factory.mktemp(f"ops_{isa}"), isa=isa)
    return out


def lib_for(libs, build, kernel):
    """The library of `build` with `kernel` in it, or the test skips saying which is missing."""
    if build not in libs:
        pytest.skip(f"the {build} build is an x86 build; elsewhere the native build is the only one")
    if kernel not in kernels(libs[build]):
        pytest.skip(f"this CPU/build has no {kernel} kernel (has {kernels(libs[build])})")
    return libs[build]
