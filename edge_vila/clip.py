"""A video file as a clip: `num_video_frames` frames sampled evenly, as VILA samples a video
(its config's num_video_frames, 8 in the releases), each then one image of the message.

NVILA's own video encoder (TSPVideoEncoder) pools the frames' tokens over time; edge-vila
does not implement that pooling: a clip's frames go in as separate images (what VILA1.5
does), so for NVILA a clip costs frames x (256 + 1) positions instead of the pooled count.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import InputError
from .preprocess import sample_frame_indices

log = logging.getLogger(__name__)


def clip_frames(path: str | Path, n: int) -> list[np.ndarray]:
    """n frames (RGB uint8 [H, W, 3]) evenly spaced over the video at `path`, in order."""
    path = Path(path)
    if n < 1:
        raise InputError(f"frames per clip must be >= 1, got {n}")
    if not path.is_file():
        raise InputError(f"{path}: no such video file" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        import cv2
    except ImportError:
        raise InputError("reading a video needs OpenCV (pip install opencv-python-headless)") from None
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise InputError(f"{path}: not a video OpenCV can open")
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        frames = _by_seek(cap, cv2, sample_frame_indices(count, n)) if count > 0 else None
        if frames is None:  # no frame count or a failed seek (some containers): read it all once
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            every = []
            while True:
                ok, bgr = cap.read()
                if not ok:
                    break
                every.append(bgr)
            frames = [every[i] for i in sample_frame_indices(len(every), n)]
    finally:
        cap.release()
    if not frames:
        raise InputError(f"{path}: the video has no readable frames")
    log.info("%s: %d frames sampled", path, len(frames))
    return [np.ascontiguousarray(f[:, :, ::-1]) for f in frames]


def _by_seek(cap, cv2, indices: list[int]) -> list[np.ndarray] | None:
    out = []
    for i in indices:
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        ok, bgr = cap.read()
        if not ok:
            return None
        out.append(bgr)
    return out
