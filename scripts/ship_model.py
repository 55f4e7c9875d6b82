"""Copy a finished training run's final checkpoint into models/ with the card that says where it
came from: the recipe (as run, and the file's sha256), the commit, the date, the wall time and
the held-out eval the run wrote. This is how models/shapes-tiny was made:

    edge-vila train recipes/tiny.yaml --out runs/tiny
    .venv/bin/python scripts/ship_model.py runs/tiny recipes/tiny.yaml models/shapes-tiny --wall-s 1080
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import time
from pathlib import Path

from edge_vila.fsutil import atomic_dir, atomic_write_json
from edge_vila.train.config import load_recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="the training run folder (holds stage*/ and eval.json)")
    p.add_argument("recipe", type=Path, help="the recipe file it was trained with")
    p.add_argument("out", type=Path, help="where the shipped checkpoint goes")
    p.add_argument("--wall-s", type=float, default=None, help="the run's wall time, if measured outside")
    a = p.parse_args()
    recipe = load_recipe(a.recipe)
    final = a.run / f"stage{len(recipe.stages) - 1}-{recipe.stages[-1].kind}"
    ev = json.loads((a.run / "eval.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    card = {
        "name": a.out.name, "what": "a VILA-layout checkpoint of the synthetic shapes world, trained by edge-vila's "
        "own recipe; it answers questions about scenes of coloured shapes, nothing else",
        "recipe": {"name": recipe.name, "file": str(a.recipe), "sha256": hashlib.sha256(a.recipe.read_bytes()).hexdigest(),
                   "config": recipe.to_dict()},
        "commit": commit, "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
        f"{len(__import__('os').sched_getaffinity(0))} cores", "train_wall_s": a.wall_s,
        "eval": {"task": ev["task"], "n": ev["n"], "accuracy": ev["accuracy"], "per_type": ev["per_type"],
                 "text_perplexity": (ev.get("text") or {}).get("perplexity")},
        "reproduce": f"edge-vila train {a.recipe} --out runs/{recipe.name}",
    }
    with atomic_dir(a.out) as tmp:
        for f in final.iterdir():
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        atomic_write_json(tmp / "edge_vila_model.json", card)
    print(f"{a.out}: {ev['accuracy'] * 100:.1f}% held-out VQA on {ev['n']} questions (commit {commit[:7]})")


if __name__ == "__main__":
    main()
