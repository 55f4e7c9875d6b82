"""The training recipe: every stage writes a loadable VILA checkpoint; kill -9 mid-stage
and rerun resumes to the same weights; two DDP ranks stay in sync."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edge_vila.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "smoke.yaml"


def train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edge_vila", "train", str(SMOKE), "--out", str(out), "--no-eval", "--threads", "1",
            *extra]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for sub in ("llm", "mm_projector", "vision_tower"):
        out.update({f"{sub}/{k}": v for k, v in load_file(str(ckpt / sub / "model.safetensors")).items()})
    return out


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    r = subprocess.run(train_cmd(out), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_every_stage_writes_a_vila_checkpoint(smoke_run):
    for name in ("stage0-clip", "stage1-align", "stage2-pretrain", "stage3-sft"):
        cfg = load_config(smoke_run / name)
        assert cfg.is_multimodal and cfg.projector.kind == "mlp_downsample" and cfg.chat_template == "edge"
    rows = [json.loads(x) for x in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"clip", "align", "pretrain", "sft"}
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 for r in rows)
    assert (smoke_run / "loss_curve.png").stat().st_size > 1000
    assert not (smoke_run / "_resume").exists()
    # stage 1 trains only the projector: ViT and LLM are bit-identical to stage 0's
    w0, w1 = _weights(smoke_run / "stage0-clip"), _weights(smoke_run / "stage1-align")
    assert all(torch.equal(w0[k], w1[k]) for k in w0 if not k.startswith("mm_projector"))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if k.startswith("mm_projector"))


def test_kill_mid_stage_then_rerun_resumes_to_identical_weights(smoke_run, tmp_path):
    out = tmp_path / "run"
    cmd = train_cmd(out, "--set", "stages.3.steps=12")  # same as the reference run
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = out / "_resume" / "state.json"
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            try:
                meta = json.loads(state.read_text())["meta"]
            except (json.JSONDecodeError, FileNotFoundError):
                meta = {}
            if meta.get("stage") == 3:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = meta["step"]
                break
        time.sleep(0.005)
    proc.wait()
    if killed_at is None:
        pytest.fail("run finished before it could be killed in stage 3")
    assert not (out / "stage3-sft" / "config.json").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming stage 3 (sft) at step" in r.stderr
    a, b = _weights(smoke_run / "stage3-sft"), _weights(out / "stage3-sft")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["stage"] == 3]
    assert steps == sorted(set(steps))  # no duplicated metric rows after the resume


@pytest.mark.slow
def test_ddp_two_processes_stay_in_sync(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "edge_vila", "train", str(SMOKE), "--out", str(out), "--no-eval", "--threads", "1",
           "--set", "stages.0.steps=4", "--set", "stages.1.steps=4", "--set", "stages.2.steps=4",
           "--set", "stages.3.steps=4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    sync = json.loads((out / "ddp_sync.json").read_text())
    assert [s["stage"] for s in sync] == [0, 1, 2, 3]
    assert all(s["world"] == 2 and s["in_sync"] for s in sync)
    assert load_config(out / "stage3-sft").is_multimodal
