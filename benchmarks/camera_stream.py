"""Camera figures (issue #7): on `synthetic://` at 30 fps, is the latency from frame capture
to the first answer token within TTFT + one frame interval, and are the answers right?

    python benchmarks/camera_stream.py BUNDLE [--queries 40] [--every 0.5] [--out runs/bench/camera]

Each prompt is asked about a stream of changing scenes; the truth comes from the scene each
frame was rendered from (frame.meta). Not a test: figures depend on the machine and model.

--still N also asks each prompt about the stream's first N scenes rendered still and at four
phases of the stream's drift (no timing): where the stream's accuracy is lost to motion rather
than to what the model sees in a still frame.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
from pathlib import Path

import edge_vila
from edge_vila.generate import SamplingParams
from edge_vila.synthetic.world import normalize_answer
from edge_vila.video import SyntheticSource, open_source
from edge_vila.videoquery import VideoQuery

PROMPTS = {  # prompt -> truth(scene)
    "How many shapes are there?": lambda s: str(s.count()),
    "Is there a red circle?": lambda s: "yes" if any(o.color == "red" and o.shape == "circle" for o in s.objects) else "no",
    "Is there a blue square?": lambda s: "yes" if any(o.color == "blue" and o.shape == "square" for o in s.objects) else "no",
    "How many circles are there?": lambda s: str(s.count("circle")),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--fps", type=float, default=30)
    ap.add_argument("--queries", type=int, default=40, help="per prompt")
    ap.add_argument("--every", type=float, default=0.5)
    ap.add_argument("--out", default="runs/bench/camera")
    ap.add_argument("--still", type=int, default=0, metavar="N", help="also ask about N stream scenes still and drifting")
    a = ap.parse_args()
    pipe = edge_vila.load(a.bundle)
    size = pipe.cfg.preprocess.height
    frame_interval = 1 / a.fps
    report = {"machine": platform.processor() or platform.machine(), "fps": a.fps, "prompts": {}}
    for prompt, truth in PROMPTS.items():
        uri = f"synthetic://shapes?fps={a.fps:g}&size={size}&hold={a.every * 0.9:g}&seed=11"
        with open_source(uri) as src:
            vq = VideoQuery(pipe, src, prompt, every=a.every, params=SamplingParams(max_new_tokens=4))
            done = [ans for kind, ans in vq.run(max_queries=a.queries) if kind == "done"]
            fps = src.fps
        correct = [normalize_answer(x.text) == truth(x.frame.meta["scene"]) for x in done]
        within = [x.capture_to_first_token_s <= x.ttft_s + frame_interval for x in done]
        report["prompts"][prompt] = {
            "queries": len(done), "accuracy": sum(correct) / len(done),
            "capture_to_first_token_ms_median": 1000 * statistics.median(x.capture_to_first_token_s for x in done),
            "ttft_ms_median": 1000 * statistics.median(x.ttft_s for x in done),
            "within_ttft_plus_frame": sum(within) / len(done), "capture_fps": fps,
            "prefill_tokens": done[-1].prefill_tokens, "reused_tokens": done[-1].reused_tokens}
        print(f"{prompt:32s} acc {sum(correct) / len(done):6.1%}  capture->token "
              f"{report['prompts'][prompt]['capture_to_first_token_ms_median']:.1f} ms  TTFT "
              f"{report['prompts'][prompt]['ttft_ms_median']:.1f} ms  within TTFT+frame "
              f"{sum(within) / len(done):.0%}  (capture {fps:.1f} fps)")
    allq = sum(p["queries"] for p in report["prompts"].values())
    report["accuracy_all"] = sum(p["accuracy"] * p["queries"] for p in report["prompts"].values()) / allq
    report["within_all"] = sum(p["within_ttft_plus_frame"] * p["queries"] for p in report["prompts"].values()) / allq
    print(f"all: accuracy {report['accuracy_all']:.1%}, latency within TTFT + one frame: {report['within_all']:.0%}")
    if a.still:
        report["still_vs_drift"] = still_vs_drift(pipe, a.still, size)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "camera.json").write_text(json.dumps(report, indent=2))


def still_vs_drift(pipe, n: int, size: int, seed: int = 11) -> dict:
    """Accuracy per prompt on the stream's first n scenes, still and at four drift phases."""
    scenes = [SyntheticSource.stream_scene(seed, i) for i in range(n)]
    out = {}
    for name, phase in [("still", None)] + [(f"drift {k}/4", k * math.pi / 2) for k in range(4)]:
        per = {}
        for sc in scenes:
            img = (sc if phase is None else SyntheticSource.drifted(sc, phase)).render(size)
            for prompt, truth in PROMPTS.items():
                got = normalize_answer(pipe.generate(prompt, [img], SamplingParams(max_new_tokens=4)))
                per.setdefault(prompt, []).append(got == truth(sc))
        out[name] = {p: sum(v) / len(v) for p, v in per.items()}
        out[name]["all"] = sum(sum(v) for v in per.values()) / sum(len(v) for v in per.values())
        print(f"{name:10s} all {out[name]['all']:6.1%}  " + "  ".join(f"{p[:18]} {out[name][p]:.0%}" for p in PROMPTS))
    return out


if __name__ == "__main__":
    main()
