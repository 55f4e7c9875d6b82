"""Video sources by URI and the periodic video query (prefix reuse across frames)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from edge_vila.errors import InputError
from edge_vila.video import SyntheticSource, open_source

cv2 = pytest.importorskip("cv2")


def test_synthetic_newest_frame_wins():
    with open_source("synthetic://shapes?fps=60&size=48&hold=0.2&seed=3") as src:
        f0 = src.read(timeout=2)
        assert f0.image.shape == (48, 48, 3) and f0.image.dtype == np.uint8 and "scene" in f0.meta
        time.sleep(0.5)  # nobody reads: frames are overwritten, nothing queues
        f1 = src.read(timeout=2, newer_than=f0.index)
        assert f1.index - f0.index >= 10 and f1.meta["scene_id"] > f0.meta["scene_id"]
        assert time.monotonic() - f1.t_capture < 0.1
        assert 20 < src.fps < 120
    assert src.ended and not src._thread.is_alive()


def test_synthetic_drift_stays_in_the_training_world():
    """The stream's shapes travel, start from the scene as drawn, and never leave
    the range where the training world places them: every frame is a scene the model could see."""
    import math

    from edge_vila.synthetic.world import JITTER

    for i in range(50):
        scene = SyntheticSource.stream_scene(11, i)
        assert np.allclose(SyntheticSource.drifted(scene, 0.0).jitter, scene.jitter)
        moved = 0.0
        for k in range(1, 16):
            d = SyntheticSource.drifted(scene, k * math.pi / 8)
            assert all(abs(c) <= JITTER + 1e-9 for xy in d.jitter for c in xy)
            moved = max(moved, max(abs(a - b) for xy, xy0 in zip(d.jitter, scene.jitter) for a, b in zip(xy, xy0)))
        assert moved > JITTER / 2  # each scene's shapes travel, not just wobble in place


def test_folder_and_file_sources(tmp_path, photo):
    from PIL import Image

    for i, name in enumerate(["astronaut", "chelsea", "coffee"]):
        Image.open(photo.parent / f"{name}.png").convert("RGB").resize((64, 48)).save(tmp_path / f"{i}.png")
    with open_source(f"{tmp_path}?fps=100") as src:
        frames = list(src.frames_iter(timeout=2))
    assert [f.meta["path"][-5:] for f in frames] == ["0.png", "1.png", "2.png"] and src.ended
    video = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 50, (64, 48))
    for k in range(20):
        w.write(np.full((48, 64, 3), k * 10, np.uint8))
    w.release()
    with open_source(f"file://{video}") as src:
        got = list(src.frames_iter(timeout=2))
    assert 1 <= len(got) <= 20 and got[-1].image.shape == (48, 64, 3)
    with open_source(f"{video}?realtime=0&loop=1") as src:
        time.sleep(0.3)
        assert src.frames > 20 and not src.ended  # looping past the end


def test_bad_uris():
    with pytest.raises(InputError, match="no such file or folder"):
        open_source("/nonexistent/clip.mp4")
    with pytest.raises(InputError, match="unknown video source scheme 'gopher'"):
        open_source("gopher://cam")
    with pytest.raises(InputError, match="unknown synthetic world"):
        open_source("synthetic://cats")
    with pytest.raises(InputError, match="cannot open"):
        open_source("v4l2:///dev/video99")


def test_gstreamer_pipelines():
    from edge_vila.jetson.gstreamer import csi_pipeline, rtsp_pipeline

    p = csi_pipeline(1, 1920, 1080, 30)
    assert p.startswith("nvarguscamerasrc sensor-id=1 !") and "width=1920,height=1080,framerate=30/1" in p
    assert p.endswith("appsink drop=true max-buffers=1 sync=false")
    assert "rtph265depay ! h265parse ! nvv4l2decoder" in rtsp_pipeline("rtsp://cam/1", codec="h265")
    src = open_source("csi://0?width=640&height=480", start=False)
    assert "width=640,height=480" in src.target and src.api == "gstreamer"


def test_network_stream_reconnects_after_two_drops():
    from edge_vila.testing import MJPEGServer

    cam = MJPEGServer(fps=60)
    try:
        with open_source(cam.url, backoff=(0.05, 0.2)) as src:
            last = src.read(timeout=5).index
            for _ in range(2):
                cam.drop()
                time.sleep(0.4)
                cam.resume()
                f = src.read(timeout=10, newer_than=last + 5)
                assert f is not None, "no frames after the stream came back"
                last = f.index
            assert src.reconnects >= 2 and not src.ended
    finally:
        cam.close()


def test_video_query_reuses_the_question_across_frames(tiny_pipe):
    from edge_vila.generate import SamplingParams
    from edge_vila.prompt import ImageKey
    from edge_vila.videoquery import VideoQuery

    with open_source("synthetic://shapes?fps=30&size=32&hold=0.1") as src:
        vq = VideoQuery(tiny_pipe, src, "How many shapes are there?", every=0.2,
                        params=SamplingParams(max_new_tokens=3))
        done = [a for kind, a in vq.run(max_queries=3) if kind == "done"]
    assert len(done) == 3 and len({a.frame.index for a in done}) == 3
    keys, _, _ = tiny_pipe.chat().prompt_keys(vq.message, [done[-1].frame.image])
    first_image = next(i for i, k in enumerate(keys) if isinstance(k, ImageKey))
    for a in done[1:]:  # system + question come from the cache; image tokens onward are recomputed
        assert a.reused_tokens == first_image and a.prefill_tokens == len(keys) - first_image
    assert all(a.capture_to_first_token_s >= a.ttft_s > 0 for a in done)


def test_video_query_window_and_scene_change(tiny_pipe):
    from edge_vila.generate import SamplingParams
    from edge_vila.videoquery import VideoQuery

    with open_source("synthetic://shapes?fps=30&size=32&hold=100") as src:  # the scene never changes
        vq = VideoQuery(tiny_pipe, src, "What changed?", every=0.05, window=2, window_stride=2, on_change=True,
                        change_threshold=50, params=SamplingParams(max_new_tokens=2))
        done = [a for kind, a in vq.run(duration=1.0) if kind == "done"]
    assert len(done) == 1 and len(done[0].frames) == 2  # first frame asked, then unchanged scenes skipped
    assert vq.stats.skipped_unchanged > 3 and vq.message.count("<image>") == 2


def test_camera_cli_writes_answers_and_video(tiny_bundle, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out.avi"
    r = subprocess.run([sys.executable, "-m", "edge_vila", "camera", str(tiny_bundle),
                        "synthetic://shapes?fps=30&size=64", str(out), "--prompt", "How many shapes are there?",
                        "--every", "0.3", "--max-queries", "3", "--max-new-tokens", "4", "--no-status"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("[")]
    assert len(lines) == 3 and all(" frame " in l for l in lines)
    cap = cv2.VideoCapture(str(out))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    assert n >= 10  # every captured frame written with the overlay, not just the queried ones


def test_robot_loop_example(tiny_bundle):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "demos/robot_loop.py"), str(tiny_bundle), "--every", "0.1",
                        "--steps", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("[scene: ") == 2


def _numbered_video(path: Path, n: int) -> None:
    """n frames of one grey level each (8 x frame index), so a decoded frame says its index."""
    import cv2

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(n):
        w.write(np.full((48, 64, 3), 8 * i, np.uint8))
    w.release()


def test_clip_frames_are_sampled_evenly(tmp_path):
    """30 frames, 8 wanted: VILA's even sampling takes the middle of each eighth, frames
    int((i + 0.5) * 30 / 8) = 1, 5, 9, 13, 16, 20, 24, 28 (checked by each frame's grey level)."""
    from edge_vila.clip import clip_frames

    video = tmp_path / "clip.avi"
    _numbered_video(video, 30)
    frames = clip_frames(video, 8)
    assert len(frames) == 8 and frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    got = [round(float(f.mean()) / 8) for f in frames]
    assert got == [1, 5, 9, 13, 16, 20, 24, 28]
    assert len(clip_frames(video, 50)) == 30  # more wanted than there are: every frame once
    with pytest.raises(InputError, match="no such video file"):
        clip_frames(tmp_path / "missing.mp4", 8)
    (tmp_path / "noise.mp4").write_bytes(b"\0" * 100)
    with pytest.raises(InputError, match="not a video OpenCV can open|no readable frames"):
        clip_frames(tmp_path / "noise.mp4", 8)


def test_run_cli_takes_a_video_clip(tiny_bundle, tmp_path):
    import json
    import subprocess
    import sys

    video = tmp_path / "clip.avi"
    _numbered_video(video, 12)
    assert json.loads((tiny_bundle / "manifest.json").read_text())["num_video_frames"] == 8
    exe = [sys.executable, "-m", "edge_vila", "-v", "run", str(tiny_bundle), "--prompt", "What happens?",
           "--max-new-tokens", "2"]
    r = subprocess.run([*exe, "--video", str(video), "--frames", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "3 frames sampled" in r.stderr
    r = subprocess.run([*exe, "--video", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "it is a directory" in r.stderr and "Traceback" not in r.stderr


def test_a_camera_sending_garbage_frames_keeps_streaming():
    """Every 5th JPEG is random bytes: the source never raises, good frames keep coming, and
    what it could not decode is counted (a drop and a reopen), never passed on as a picture."""
    from edge_vila.testing import MJPEGServer

    cam = MJPEGServer(fps=60, garbage_every=5)
    try:
        with open_source(cam.url, backoff=(0.05, 0.2)) as src:
            seen = [src.read(timeout=10)]
            for _ in range(20):
                seen.append(src.read(timeout=10, newer_than=seen[-1].index))
                assert seen[-1] is not None, "the stream stopped delivering frames"
            assert not src.ended and cam.sent > 25
            for f in seen:  # frames are uniform grey pictures; garbage would not be
                assert f.image.shape == (48, 64, 3) and int(f.image.std()) <= 3
    finally:
        cam.close()


def test_a_stalled_camera_is_reopened_and_reported(caplog):
    """The camera keeps its connection open but sends nothing: after the URI's timeout the
    source gives up on the read, says so, reopens, and frames flow again when the camera does."""
    import logging

    from edge_vila.testing import MJPEGServer

    cam = MJPEGServer(fps=60)
    try:
        with caplog.at_level(logging.WARNING, logger="edge_vila"), \
                open_source(cam.url + "?timeout=1", backoff=(0.05, 0.2)) as src:
            assert src.read(timeout=10) is not None
            cam.stall()
            time.sleep(3)
            assert src.drops >= 1, "a stall longer than the timeout was not noticed"
            stalled_at = src.frames
            cam.resume()
            f = src.read(timeout=10, newer_than=stalled_at - 1)  # a frame captured after the stall
            assert f is not None and src.reconnects >= 1 and not src.ended
        assert "dropped" in caplog.text or "capture error" in caplog.text
    finally:
        cam.close()
