"""Faults while writing: a killed export leaves the last good bundle and nothing a re-run trips
over; a write that runs out of room fails in one line and leaves no partial bundle."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from edge_vila.bundle import read_manifest
from edge_vila.fsutil import atomic_dir, recover


def _export(ckpt, out, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge_vila", "export", str(ckpt), "--out", str(out), "--group-size",
                             "32", "--max-context", "128", "--no-report"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _leftovers(out) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_a_kill_between_the_two_renames_restores_the_old_artifact(tmp_path):
    """The one instant where neither folder is at its name: the next writer puts the old one back."""
    final = tmp_path / "bundle"
    final.mkdir()
    (final / "a").write_text("old")
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(child.stdout)  # a pid that has exited
    os.replace(final, tmp_path / f".bundle.old-{dead}")
    (tmp_path / f".bundle.{dead}.abcd.tmp").mkdir()
    recover(final)
    assert (final / "a").read_text() == "old" and _leftovers(final) == []
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("new")
    assert (final / "a").read_text() == "new" and _leftovers(final) == []


@pytest.mark.slow
def test_killed_export_keeps_the_last_bundle_and_a_rerun_completes(tiny_ckpt, tmp_path):
    out = tmp_path / "bundle"
    r = _export(tiny_ckpt, out)
    assert r.wait(timeout=600) == 0, r.stderr.read()
    first = json.loads((out / "manifest.json").read_text())["created"]
    t0 = time.monotonic()
    p = _export(tiny_ckpt, out)
    p.wait(timeout=600)
    full = time.monotonic() - t0
    for frac in (0.15, 0.4, 0.7, 0.9):  # SIGKILL at points through quantize, ONNX export and hashing
        p = _export(tiny_ckpt, out, start_new_session=True)
        time.sleep(full * frac)
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the export and its vision subprocess, as a kill -9 of the job
        except ProcessLookupError:
            pass
        p.wait()
        if p.returncode == 0:  # it finished before the kill: a complete new bundle
            continue
        recover(out)  # what the next run does first
        man = read_manifest(out)  # the previous bundle, whole: every file's sha256 checks out
        assert man["created"] >= first
    r = _export(tiny_ckpt, out)
    assert r.wait(timeout=600) == 0, r.stderr.read()
    read_manifest(out)
    assert _leftovers(out) == []


def _limit_writes(limit: int):
    def setup():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return setup


@pytest.mark.slow
def test_running_out_of_room_fails_in_one_line_and_leaves_nothing(tiny_ckpt, tmp_path):
    out = tmp_path / "bundle"
    p = _export(tiny_ckpt, out, preexec_fn=_limit_writes(64 << 10))
    _, err = p.communicate(timeout=600)
    assert p.returncode == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "File too large" in lines[0] and "nothing partial" in lines[0], err
    assert "Traceback" not in err
    assert not out.exists() and _leftovers(out) == []
