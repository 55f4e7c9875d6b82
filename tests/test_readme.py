"""The README for users: its size, what it must not say, and its checked commands run as written.

A fenced block right after a `<!-- checked -->` line holds commands a reader can paste on a
fresh clone after the quick start; every one of them runs here, from the repository root,
with the virtualenv's `edge-vila` first on PATH. The shipped model (models/shapes-tiny) is
checked against the card it carries.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MODEL = ROOT / "models" / "shapes-tiny"


def checked_commands(text: str) -> list[str]:
    """Lines of the fenced blocks that follow a `<!-- checked -->` marker (comments stripped)."""
    out, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != "<!-- checked -->":
            continue
        j = i + 1
        assert lines[j].startswith("```"), f"README line {j + 1}: a checked marker must precede a fenced block"
        j += 1
        while not lines[j].startswith("```"):
            cmd = re.sub(r"\s+#.*$", "", lines[j]).strip()
            if cmd:
                out.append(cmd)
            j += 1
    return out


def test_readme_is_for_users():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    tracked = subprocess.run(["git", "grep", "-il", "-E", "session [0-9]"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.stdout.strip() == "", tracked.stdout  # no file of the project mentions development sessions
    assert len(checked_commands(text)) >= 3


def test_readme_checked_commands_run_as_written():
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for cmd in checked_commands(README.read_text()):
        assert shlex.split(cmd)[0] == "edge-vila", f"checked commands are edge-vila verbs: {cmd}"
        r = subprocess.run(cmd, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, (cmd, r.stderr[-2000:])


def test_shipped_model_matches_its_card():
    """models/shapes-tiny: trained by recipes/tiny.yaml; its card records the recipe, the commit
    and the held-out eval; the torch reference still scores like the card on fresh questions."""
    import edge_vila
    from edge_vila.synthetic.eval import eval_shapes_vqa

    card = json.loads((MODEL / "edge_vila_model.json").read_text())
    assert card["recipe"]["name"] == "tiny" and card["commit"] and card["eval"]["n"] >= 1000
    assert card["eval"]["accuracy"] >= 0.8
    pipe = edge_vila.load(MODEL)
    res = eval_shapes_vqa(pipe, 60, seed=4242, progress=False)  # other questions than the card's
    assert res["accuracy"] >= 0.7, res["per_type"]


@pytest.mark.slow
def test_quickstart_shows_a_model_that_works(tmp_path):
    """The README's first command, into a scratch folder: summary.json with >= 80% on >= 100."""
    env = {**os.environ, "OUT": str(tmp_path / "qs"), "N": "100"}
    r = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert summary["n"] >= 100 and summary["vqa_accuracy"] >= 0.8, summary
    assert "truth:" in r.stdout and "tok/s" in r.stderr and "Traceback" not in r.stderr
