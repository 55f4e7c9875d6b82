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


def _job(*args, **kw) -> subprocess.Popen:
    """`edge-vila -q ARGS` in its own process group (a kill -9 of the job takes its children too)."""
    return subprocess.Popen([sys.executable, "-m", "edge_vila", "-q", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _export_args(ckpt, out) -> tuple:
    return ("export", ckpt, "--out", out, "--group-size", "32", "--max-context", "128", "--no-report")


def _export(ckpt, out, **kw) -> subprocess.Popen:
    return _job(*_export_args(ckpt, out), **kw)


def _kill_at(args, seconds: float) -> int:
    """Start `edge-vila ARGS`, SIGKILL its process group after `seconds`; its exit status."""
    p = _job(*args)
    time.sleep(seconds)
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.communicate()
    return p.returncode


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
    t0 = time.monotonic()
    r = _export(tiny_ckpt, out)
    assert r.wait(timeout=600) == 0, r.stderr.read()
    full = time.monotonic() - t0  # what the kill points below are fractions of
    first = json.loads((out / "manifest.json").read_text())["created"]
    for frac in (0.15, 0.4, 0.7, 0.9):  # SIGKILL at points through quantize, ONNX export and hashing
        if _kill_at(_export_args(tiny_ckpt, out), full * frac) == 0:  # finished first: a complete new bundle
            continue
        recover(out)  # what the next run does first
        man = read_manifest(out)  # the previous bundle, whole: every file's sha256 checks out
        assert man.created >= first
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


def _tensors(folder) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out.update({f"{f.relative_to(folder)}:{k}": v for k, v in load_file(str(f)).items()})
    return out


@pytest.mark.slow
def test_killed_quantize_keeps_the_last_checkpoint_and_a_rerun_completes(tiny_ckpt, tmp_path):
    import numpy as np

    out = tmp_path / "q"
    args = ("quantize", tiny_ckpt, "--out", out, "--method", "rtn", "--group-size", "32", "--no-eval",
            "--int8-images", "4")
    t0 = time.monotonic()
    p = _job(*args)
    assert p.wait(timeout=600) == 0, p.stderr.read()
    full, first = time.monotonic() - t0, _tensors(out)
    for frac in (0.2, 0.5, 0.8, 0.95):
        if _kill_at(args, full * frac) == 0:
            continue  # finished before the kill: a complete new checkpoint
        recover(out)  # what the next run does first
        now = _tensors(out)  # the previous checkpoint, whole and unchanged
        assert now.keys() == first.keys() and all(np.array_equal(now[k], first[k]) for k in first)
    p = _job(*args)
    assert p.wait(timeout=600) == 0, p.stderr.read()
    assert _leftovers(out) == [] and _tensors(out).keys() == first.keys()


@pytest.mark.slow
def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL a training run mid-stage (twice); each re-run resumes from the last saved step
    and the final checkpoint equals an uninterrupted run's."""
    import numpy as np

    from edge_vila import config

    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "smoke.yaml")
    ref, out = tmp_path / "ref", tmp_path / "killed"
    t0 = time.monotonic()
    p = _job("train", recipe, "--out", ref, "--no-eval")
    assert p.wait(timeout=600) == 0, p.stderr.read()
    full = time.monotonic() - t0
    killed = [_kill_at(("train", recipe, "--out", out, "--no-eval"), full * frac) for frac in (0.35, 0.7)]
    assert any(k != 0 for k in killed)  # at least one kill landed mid-run
    p = _job("train", recipe, "--out", out, "--no-eval")
    assert p.wait(timeout=600) == 0, p.stderr.read()
    final = sorted(d for d in out.iterdir() if (d / "config.json").is_file())[-1]
    config.load_config(final)
    a, b = _tensors(sorted(d for d in ref.iterdir() if (d / "config.json").is_file())[-1]), _tensors(final)
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    assert worst <= 1e-5, worst
