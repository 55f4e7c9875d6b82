"""A robot control loop that embeds edge-vila in-process.

Every `--every` seconds the newest camera frame is checked with a yes/no question; the
answer drives a (here: logged) action. The fixed part of the prompt stays in the KV
cache between frames, so each query recomputes only the image tokens and the question.

    python demos/robot_loop.py CKPT_OR_BUNDLE --frames DIR_OF_IMAGES --question "Is the path clear?"
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import edge_vila

log = logging.getLogger("robot")


def decide(answer: str) -> str:
    a = answer.strip().lower()
    return "drive" if a.startswith("yes") else "stop" if a.startswith("no") else "slow"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--frames", required=True, help="folder of images standing in for the camera")
    ap.add_argument("--question", default="Is the path clear? Answer yes or no.")
    ap.add_argument("--every", type=float, default=0.0, help="seconds between queries")
    ap.add_argument("--max-steps", type=int, default=10)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    pipe = edge_vila.load(a.model)
    frames = sorted(p for p in Path(a.frames).iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    for step, frame in enumerate(frames[: a.max_steps]):
        t0 = time.perf_counter()
        answer = pipe.generate(a.question, images=[frame], max_new_tokens=8)
        st = pipe.stats
        log.info("%s -> %r -> %s (%.0f ms, reused %d tokens)", frame.name, answer, decide(answer),
                 (time.perf_counter() - t0) * 1000, st.reused_tokens)
        time.sleep(a.every)


if __name__ == "__main__":
    main()
