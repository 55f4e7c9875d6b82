"""A robot control loop that embeds edge-vila in-process.

The camera is any video URI (a V4L2/CSI camera on the robot, a clip, a folder, or the
synthetic world). Every `--every` seconds the newest frame is checked with a question; the
answer drives an action (here: logged). The question stays in the KV cache between frames,
so each query recomputes only the image tokens and what follows.

    python demos/robot_loop.py BUNDLE --camera csi://0 --question "Is there a red object?"
    python demos/robot_loop.py BUNDLE --camera "synthetic://shapes?fps=30&hold=3" --steps 10
"""
from __future__ import annotations

import argparse
import logging

import edge_vila
from edge_vila.generate import SamplingParams
from edge_vila.video import open_source
from edge_vila.videoquery import VideoQuery

log = logging.getLogger("robot")


def decide(answer: str) -> str:
    a = answer.strip().lower()
    return "stop" if a.startswith("yes") else "drive" if a.startswith("no") else "slow"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="bundle (or checkpoint)")
    ap.add_argument("--camera", default="synthetic://shapes?fps=30&hold=3")
    ap.add_argument("--question", default="Is there a red square?")
    ap.add_argument("--every", type=float, default=1.0, help="seconds between queries")
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    pipe = edge_vila.load(a.model)
    with open_source(a.camera) as cam:
        vq = VideoQuery(pipe, cam, a.question, every=a.every, params=SamplingParams(max_new_tokens=4))
        for kind, ans in vq.run(max_queries=a.steps):
            if kind != "done":
                continue
            truth = ans.frame.meta.get("scene")
            log.info("frame %d (%.0f ms old at first token): %r -> %s%s", ans.frame.index,
                     ans.capture_to_first_token_s * 1000, ans.text.strip(), decide(ans.text),
                     f"   [scene: {truth.caption()}]" if truth else "")


if __name__ == "__main__":
    main()
