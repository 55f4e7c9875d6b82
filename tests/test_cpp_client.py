"""The C++ client: CMake build + ctest, whose live test runs the example against a real
`edge-vila serve` on loopback (started and stopped by ctest fixtures)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cmake_build_and_ctest(tmp_path):
    for tool in ("cmake", "ctest", "c++"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install cmake g++)")
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DEDGE_VILA_PYTHON={sys.executable}"],
                   check=True, capture_output=True, text=True)
    r = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning" not in r.stdout.lower() + r.stderr.lower(), r.stdout + r.stderr
    r = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "100% tests passed" in r.stdout and "ask_frame_live" in r.stdout
