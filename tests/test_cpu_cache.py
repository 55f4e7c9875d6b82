"""The CPU backend's private artifacts (engines/ort-cpu/): built by `edge-vila build --target
ort-cpu` (or a first load), verified against their hash records on every load, rebuilt when
they do not match; a load of a built cache only loads - no calibration, no compiler."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

import edge_vila
from edge_vila.backends.cpu_cache import KV_SCALES_FILE, RECORD, verify
from edge_vila.errors import InputError
from edge_vila.fsutil import sha256_file


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    """A private copy of the session's tiny INT4 bundle, without any cache."""
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b, ignore=shutil.ignore_patterns("engines"))
    return b


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_vila", *args], capture_output=True, text=True)


def _cache(b):
    """The fast LLM graph's folder (on x86 without VNNI a derived U8U8 ViT's sits beside it)."""
    (folder,) = [p for p in (b / "engines" / "ort-cpu").iterdir() if p.is_dir() and not p.name.startswith("vision-")]
    return folder


# a fresh interpreter: counts every process started (a compiler, or anything) and every fast-graph
# build while loading a bundle and answering once; reports which toolchain modules got imported
_COUNTING_LOAD = r"""
import json, subprocess, sys
started = []
_init = subprocess.Popen.__init__
def counting(self, args, *a, **k):
    started.append(args if isinstance(args, str) else " ".join(map(str, args)))
    _init(self, args, *a, **k)
subprocess.Popen.__init__ = counting
import edge_vila.backends.ort_fast as ort_fast
builds = []
_build = ort_fast.build_fast_llm
ort_fast.build_fast_llm = lambda *a, **k: builds.append(a) or _build(*a, **k)
import edge_vila
pipe = edge_vila.load(sys.argv[1])
answer = pipe.generate("What is in the image?", max_new_tokens=6)
print(json.dumps({"started": started, "builds": len(builds), "kv_cache": pipe.backend.kv_cache,
                  "answer": answer, "toolchain": sorted(m for m in sys.modules
                  if m.split(".")[0] in ("torch", "onnx") or m.startswith(("edge_vila.export", "edge_vila.quant")))}))
"""


def test_build_then_load_never_calibrates_or_compiles(bundle):
    r = _cli("build", str(bundle), "--target", "ort-cpu")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["built_now"] and rep["kv_cache"] == "int8" and rep["key"]["kv8"], rep
    folder = _cache(bundle)
    assert str(folder) == rep["folder"] and verify(folder, json.loads((folder / RECORD).read_text())["sources"],
                                                   _key(folder)) is None
    again = json.loads(_cli("build", str(bundle), "--target", "ort-cpu").stdout)
    assert not again["built_now"]  # verified, kept
    out = json.loads(subprocess.run([sys.executable, "-c", _COUNTING_LOAD, str(bundle)], capture_output=True,
                                    text=True, check=True).stdout)
    assert out["started"] == [] and out["builds"] == 0, out  # no compiler, no build
    assert out["toolchain"] == [], out  # calibration lives in export/: not even imported
    assert out["kv_cache"] == "int8" and out["answer"]


def _key(folder):
    from edge_vila.backends.cpu_cache import FastGraphKey

    return FastGraphKey(**json.loads((folder / RECORD).read_text())["key"])


def _corrupt(kind: str, folder) -> None:
    data = folder / "llm_fast.onnx.data"
    if kind == "overwritten":  # 64 bytes in the middle of the weights, same size
        with open(data, "r+b") as f:
            f.seek(data.stat().st_size // 2)
            f.write(os.urandom(64))
    elif kind == "truncated":
        os.truncate(data, data.stat().st_size // 3)
    elif kind == "foreign":  # a record from other bundle files: the folder belongs to another bundle
        rec = json.loads((folder / RECORD).read_text())
        rec["sources"]["llm.onnx"] = "0" * 64
        (folder / RECORD).write_text(json.dumps(rec))
    elif kind == "unrecorded":  # an interrupted build: files, no record
        (folder / RECORD).unlink()


@pytest.mark.parametrize("kind", ["overwritten", "truncated", "foreign", "unrecorded"])
def test_a_bad_cache_is_detected_and_rebuilt_never_used(bundle, kind, caplog):
    want = edge_vila.load(bundle).generate("How many shapes are there?", max_new_tokens=8)
    folder = _cache(bundle)
    _corrupt(kind, folder)
    with caplog.at_level(logging.WARNING, logger="edge_vila"):
        pipe = edge_vila.load(bundle)
    assert any("not using this cached fast graph" in r.getMessage() for r in caplog.records), caplog.text
    assert pipe.generate("How many shapes are there?", max_new_tokens=8) == want
    assert verify(folder, json.loads((folder / RECORD).read_text())["sources"], _key(folder)) is None


def test_a_bundle_without_kv_scales_runs_fp32_kv_and_says_so(bundle, caplog):
    man = json.loads((bundle / "manifest.json").read_text())
    assert KV_SCALES_FILE in man["files"]  # export wrote them
    del man["files"][KV_SCALES_FILE]
    (bundle / KV_SCALES_FILE).unlink()
    (bundle / "manifest.json").write_text(json.dumps(man))
    with caplog.at_level(logging.WARNING, logger="edge_vila"):
        pipe = edge_vila.load(bundle)
    assert pipe.backend.kv_cache == "fp32" and "re-export" in caplog.text
    with pytest.raises(InputError, match=KV_SCALES_FILE):
        edge_vila.load(bundle, kv_cache="int8")


def test_the_compiled_ops_library_is_verified_before_use(tmp_path, caplog):
    from edge_vila.backends import native_ops

    lib = native_ops.build_library(tmp_path)
    record = lib.with_name(lib.name + ".sha256").read_text().strip()
    assert record == sha256_file(lib)
    assert native_ops.build_library(tmp_path) == lib  # verified, reused
    with open(lib, "r+b") as f:  # 64 bytes overwritten: never loaded, rebuilt
        f.seek(lib.stat().st_size // 2)
        f.write(bytes(64))
    with caplog.at_level(logging.WARNING, logger="edge_vila"):
        assert native_ops.build_library(tmp_path) == lib
    assert "sha256 mismatch" in caplog.text
    assert sha256_file(lib) == lib.with_name(lib.name + ".sha256").read_text().strip()


def test_a_bundle_that_cannot_be_written_caches_in_the_user_dir(bundle, tmp_path, monkeypatch, caplog):
    """A read-only bundle's cache goes to $XDG_CACHE_HOME/edge-vila/ort-cpu/. (Tests run as root
    here, for whom permissions do not stop a write: `engines` is made a plain file instead, so
    the bundle's cache folder cannot be created.)"""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (bundle / "engines").write_text("not a folder")
    with caplog.at_level(logging.INFO, logger="edge_vila"):
        pipe = edge_vila.load(bundle)
    assert pipe.backend.kv_cache == "int8" and "using the user's cache dir" in caplog.text
    (folder,) = [p for p in (tmp_path / "cache" / "edge-vila" / "ort-cpu").iterdir() if not p.name.startswith("vision-")]
    assert verify(folder, json.loads((folder / RECORD).read_text())["sources"], _key(folder)) is None
    assert (bundle / "engines").read_text() == "not a folder"  # the bundle untouched
