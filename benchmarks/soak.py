"""Soak (issue #7): a 30 fps network camera queried every second for --minutes, with the
camera dropping its link twice. Resident memory must stay flat (within ±5% after warm-up),
the capture must not queue, and the source must recover by itself.

    python benchmarks/soak.py BUNDLE [--minutes 10] [--out runs/bench/soak]

The camera is an MJPEG-over-HTTP server on loopback serving the synthetic world
(edge_vila.testing.MJPEGServer); it goes down for 3 s at 1/3 and 2/3 of the run.
Writes soak.json and soak.png (RSS over time, drops marked).
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np

import edge_vila
from edge_vila.demo import rss_mb
from edge_vila.generate import SamplingParams
from edge_vila.testing import MJPEGServer
from edge_vila.synthetic.world import random_scene, rng_for
from edge_vila.video import open_source
from edge_vila.videoquery import VideoQuery


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--fps", type=float, default=30)
    ap.add_argument("--every", type=float, default=1.0)
    ap.add_argument("--out", default="runs/bench/soak")
    a = ap.parse_args()
    pipe = edge_vila.load(a.bundle)
    size = pipe.cfg.preprocess.height
    scenes = [np.asarray(random_scene(rng_for(5, k)).render(size)) for k in range(50)]
    cam = MJPEGServer(fps=a.fps, size=(size, size), frame_fn=lambda i: scenes[(i // int(a.fps * 2)) % len(scenes)])
    duration = a.minutes * 60
    drops: list[float] = []
    t0 = time.monotonic()

    def dropper():
        for frac in (1 / 3, 2 / 3):
            time.sleep(max(0.0, t0 + frac * duration - time.monotonic()))
            drops.append(time.monotonic() - t0)
            cam.drop()
            time.sleep(3)
            cam.resume()

    threading.Thread(target=dropper, daemon=True).start()
    samples = []  # (t, rss MB, frames captured, queries)
    errors = 0
    with open_source(cam.url, backoff=(0.2, 2.0)) as src:
        vq = VideoQuery(pipe, src, "How many shapes are there?", every=a.every, params=SamplingParams(max_new_tokens=4))
        next_sample = 0.0
        try:
            for kind, _ in vq.run(duration=duration):
                t = time.monotonic() - t0
                if kind == "done" and t >= next_sample:
                    samples.append((t, rss_mb(), src.frames, vq.stats.queries))
                    next_sample = t + 5
        except Exception as e:  # the soak's point is that nothing escapes; count it if it does
            errors += 1
            print(f"error: {e!r}")
        reconnects, frames, ended = src.reconnects, src.frames, src.ended
    cam.close()
    warm = [r for t, r, *_ in samples if t >= 60] or [r for _, r, *_ in samples]
    ref = warm[0]
    drift = max(abs(r - ref) / ref for r in warm)
    expected_frames = a.fps * (duration - 6)
    res = {"minutes": a.minutes, "queries": vq.stats.queries, "frames_captured": frames,
           "capture_fraction_of_source": frames / expected_frames, "reconnects": reconnects,
           "source_ended": ended, "drops_at_s": drops, "rss_mb_after_warmup": [min(warm), max(warm)],
           "rss_drift_after_warmup": drift, "errors": errors, "samples": samples}
    print(f"queries {vq.stats.queries}, frames {frames} ({res['capture_fraction_of_source']:.0%} of the source's), "
          f"reconnects {reconnects}, RSS {min(warm):.0f}-{max(warm):.0f} MB after warm-up "
          f"(drift {drift:.1%}), errors {errors}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(res, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3))
        ax.plot([s[0] / 60 for s in samples], [s[1] for s in samples], color="#76b900")
        for d in drops:
            ax.axvline(d / 60, color="red", ls="--", lw=1)
        ax.set(xlabel="minutes", ylabel="RSS (MB)", title=f"soak: {a.fps:g} fps camera, a query every {a.every:g} s "
               f"(red: camera link dropped)")
        fig.tight_layout()
        fig.savefig(out / "soak.png", dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
