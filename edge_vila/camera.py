"""`edge-vila camera BUNDLE INPUT_URI [OUTPUT_URI]`: live video in, answers out.

Outputs by URI, as for inputs: a video file (`out.mp4`, `out.avi`), a folder of annotated
JPEGs (`frames/`), `display://0` (an OpenCV window; needs a GUI build of OpenCV), or none
(`--headless`). A render thread writes every captured frame with the latest answer drawn
on it, while the query loop asks the model; the terminal shows the answers as they stream,
stamped with the capture time of the frame they describe, and a status line.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import InputError
from .video import VideoSource

log = logging.getLogger(__name__)


def annotate(img: np.ndarray, lines: list[str]) -> np.ndarray:
    """Draw text lines on a dark band at the bottom of the frame."""
    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    h = 12 * len(lines) + 4
    d.rectangle([0, im.height - h, im.width, im.height], fill=(0, 0, 0))
    for i, line in enumerate(lines):
        d.text((3, im.height - h + 2 + 12 * i), line, fill=(255, 255, 255))
    return np.asarray(im)


class Sink:
    def write(self, img: np.ndarray) -> None: ...

    def close(self) -> None: ...


class VideoFileSink(Sink):
    def __init__(self, path: Path, fps: float):
        import cv2

        self.cv2, self.path, self.fps, self.w = cv2, path, fps, None

    def write(self, img: np.ndarray) -> None:
        cv2 = self.cv2
        if self.w is None:
            fourcc = cv2.VideoWriter_fourcc(*("mp4v" if self.path.suffix.lower() == ".mp4" else "MJPG"))
            self.w = cv2.VideoWriter(str(self.path), fourcc, self.fps, (img.shape[1], img.shape[0]))
            if not self.w.isOpened():
                raise InputError(f"{self.path}: OpenCV cannot write this video format")
        self.w.write(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self.w is not None:
            self.w.release()


class FolderSink(Sink):
    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.n = folder, 0

    def write(self, img: np.ndarray) -> None:
        Image.fromarray(img).save(self.folder / f"{self.n:06d}.jpg", quality=90)
        self.n += 1


class DisplaySink(Sink):
    def __init__(self, title: str = "edge-vila"):
        import cv2

        self.cv2, self.title = cv2, title
        try:
            cv2.namedWindow(title)
        except cv2.error as e:
            raise InputError(f"display:// needs OpenCV with a GUI (opencv-python, not -headless) and a display: {e}") \
                from None

    def write(self, img: np.ndarray) -> None:
        self.cv2.imshow(self.title, self.cv2.cvtColor(img, self.cv2.COLOR_RGB2BGR))
        self.cv2.waitKey(1)

    def close(self) -> None:
        self.cv2.destroyAllWindows()


def open_sink(uri: str | None, fps: float = 30.0) -> Sink | None:
    if not uri:
        return None
    if uri.startswith("display://"):
        return DisplaySink()
    p = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    if p.suffix.lower() in (".mp4", ".avi", ".mkv"):
        p.parent.mkdir(parents=True, exist_ok=True)
        return VideoFileSink(p, fps)
    if p.suffix == "" or p.is_dir():
        return FolderSink(p)
    raise InputError(f"{uri}: unknown output (expected a .mp4/.avi file, a folder or display://0)")


class Renderer:
    """Writes the newest frames with the current answer overlaid, on its own thread."""

    def __init__(self, source: VideoSource, sink: Sink):
        self.source, self.sink = source, sink
        self.lines: list[str] = []
        self.written = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="render", daemon=True)
        self._t.start()

    def _run(self) -> None:
        last = -1
        while not self._stop.is_set():
            f = self.source.read(timeout=0.5, newer_than=last)
            if f is None:
                if self.source.ended:
                    return
                continue
            last = f.index
            self.sink.write(annotate(f.image, list(self.lines)))
            self.written += 1

    def close(self) -> None:
        self._stop.set()
        self._t.join(timeout=5)
        self.sink.close()


def run_camera(pipe, source: VideoSource, prompt: str, output: str | None, every: float, on_change: bool,
               window: int, params, max_queries: int | None, duration: float | None, status: bool = True,
               out=sys.stdout) -> list:
    from .videoquery import VideoQuery

    sink = open_sink(output, fps=30.0)
    renderer = Renderer(source, sink) if sink else None
    vq = VideoQuery(pipe, source, prompt, every=every, on_change=on_change, window=window, params=params)
    answers = []
    shown = ""  # text of the current answer already printed
    try:
        for kind, ans in vq.run(max_queries=max_queries, duration=duration, max_interval=every * 5):
            if kind == "delta":
                if not shown:
                    wall = ans.frame_wall_time
                    stamp = time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}"
                    out.write(f"{'' if not status else chr(13)}[{stamp} frame {ans.frame.index}] ")
                out.write(ans.text[len(shown):])
                shown = ans.text
                out.flush()
                continue
            answers.append(ans)
            out.write("\n")
            shown = ""
            if renderer:
                renderer.lines = [f"{prompt}", f"-> {ans.text.strip()}",
                                  f"{source.fps:.0f} fps  TTFT {ans.ttft_s * 1000:.0f} ms  "
                                  + (f"{ans.tokens_per_s:.0f} tok/s" if ans.tokens_per_s > 0 else "— tok/s")]
            if status:
                sys.stderr.write(vq.stats.line())
                sys.stderr.flush()
            out.flush()
    finally:
        if status:
            sys.stderr.write("\n")
        if renderer:
            renderer.close()
        source.close()
    return answers


__all__ = ["run_camera", "open_sink", "annotate", "Renderer"]
