"""Loss curves as PNG (matplotlib, headless)."""
from __future__ import annotations

import json
from pathlib import Path


def plot_losses(metrics: Path, out: Path) -> Path | None:
    if not metrics.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    if not rows:
        return None
    stages = sorted({(r["stage"], r["kind"]) for r in rows})
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2), squeeze=False)
    for ax, (s, kind) in zip(axes[0], stages):
        pts = [(r["step"], r["loss"]) for r in rows if r["stage"] == s]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(f"stage {s}: {kind}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss")
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
