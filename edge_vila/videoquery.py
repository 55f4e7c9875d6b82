"""Ask a VLM about a live video: the newest frame (or a window of frames) every N seconds,
or when the scene changes.

The prompt is laid out question-first, images last (`USER: {prompt}\\n<image> ASSISTANT:`),
so the fixed part — system prompt and question — stays in the KV cache from frame to frame
and each query forwards only the new image tokens and what follows them. Answers stream
as events that carry the capture time of the frame they describe.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .generate import SamplingParams
from .video import Frame, VideoSource

log = logging.getLogger(__name__)


@dataclass
class Answer:
    frames: list[Frame]
    text: str = ""
    done: bool = False
    t_start: float = 0.0                 # monotonic, when the query began
    capture_to_first_token_s: float = 0.0  # newest frame's capture -> first answer token
    ttft_s: float = 0.0                  # query start -> first token (vision + prefill)
    tokens_per_s: float = 0.0
    prefill_tokens: int = 0
    reused_tokens: int = 0
    query_index: int = 0

    @property
    def frame(self) -> Frame:
        return self.frames[-1]

    @property
    def frame_wall_time(self) -> float:
        """Wall-clock time (epoch seconds) at which the described frame was captured."""
        return time.time() - (time.monotonic() - self.frame.t_capture)


@dataclass
class QueryStats:
    queries: int = 0
    skipped_unchanged: int = 0
    fps: float = 0.0
    last_ttft_s: float = 0.0
    last_tokens_per_s: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def line(self) -> str:
        rate = f"{self.last_tokens_per_s:5.1f}" if self.last_tokens_per_s > 0 else "    —"
        return (f"capture {self.fps:5.1f} fps | TTFT {self.last_ttft_s * 1000:6.0f} ms | "
                f"{rate} tok/s | queries {self.queries}")


def frame_signature(img: np.ndarray, side: int = 16) -> np.ndarray:
    """A tiny grey thumbnail: cheap scene-change detection (mean abs difference)."""
    from PIL import Image

    return np.asarray(Image.fromarray(img).convert("L").resize((side, side), Image.BILINEAR), np.float32)


class VideoQuery:
    def __init__(self, pipe, source: VideoSource, prompt: str, every: float = 2.0, on_change: bool = False,
                 change_threshold: float = 8.0, window: int = 1, window_stride: int = 5,
                 params: SamplingParams | None = None):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.pipe = pipe
        self.source = source
        self.prompt = prompt
        self.every = every
        self.on_change = on_change
        self.change_threshold = change_threshold
        self.window = window
        self.window_stride = max(1, window_stride)
        self.params = params or SamplingParams(max_new_tokens=32)
        self.stats = QueryStats()
        self._recent: collections.deque[Frame] = collections.deque(maxlen=window * self.window_stride)
        self._last_sig: np.ndarray | None = None
        # question first, images last: the question's tokens stay cached across frames
        t = dataclasses.replace(pipe.template, image_first=False)
        self.message = t.attach_images(prompt, window, pipe.cfg.image_tokens.marker_sep)

    def _changed(self, frame: Frame) -> bool:
        sig = frame_signature(frame.image)
        if self._last_sig is None or sig.shape != self._last_sig.shape:
            return True
        return float(np.abs(sig - self._last_sig).mean()) >= self.change_threshold

    def ask(self, frames: list[Frame]) -> Iterator[tuple[str, Answer]]:
        """One query about `frames` (oldest first): yields ('delta', answer) then ('done', answer)."""
        ans = Answer(frames=frames, t_start=time.monotonic(), query_index=self.stats.queries)
        chat = self.pipe.chat()
        first = None
        for delta in chat.stream(self.message, [f.image for f in frames], self.params):
            if first is None:
                first = time.monotonic()
                ans.capture_to_first_token_s = first - frames[-1].t_capture
                ans.ttft_s = first - ans.t_start
            ans.text += delta
            yield "delta", ans
        st = self.pipe.stats
        ans.prefill_tokens, ans.reused_tokens = st.prefill_tokens, st.reused_tokens
        if first is None:  # empty answer (EOS first): the first token still arrived
            ans.ttft_s = st.ttft_s
            ans.capture_to_first_token_s = ans.t_start + st.ttft_s - frames[-1].t_capture
        ans.tokens_per_s = st.decode_tokens_per_s
        ans.done = True
        self._last_sig = frame_signature(frames[-1].image)
        s = self.stats
        s.queries += 1
        s.last_ttft_s, s.last_tokens_per_s = ans.ttft_s, ans.tokens_per_s
        s.latencies.append(ans.capture_to_first_token_s)
        if len(s.latencies) > 1000:
            del s.latencies[:500]
        yield "done", ans

    def run(self, max_queries: int | None = None, duration: float | None = None,
            max_interval: float | None = None) -> Iterator[tuple[str, Answer]]:
        """Query on schedule until max_queries/duration or the source ends.

        every: seconds between queries. on_change: only ask when the frame differs from the
        last asked one (mean thumbnail difference >= change_threshold), but at least every
        max_interval seconds if given.
        """
        t_end = time.monotonic() + duration if duration else None
        next_due = time.monotonic()
        last_query = -1e9
        last_index = -1
        while (max_queries is None or self.stats.queries < max_queries) and \
                (t_end is None or time.monotonic() < t_end):
            wait = max(0.0, next_due - time.monotonic())
            f = self.source.read(timeout=max(wait, 0.05) if wait > 0 else 5.0, newer_than=last_index)
            if f is None:
                if self.source.ended:
                    return
                if time.monotonic() < next_due:
                    continue
                f = self.source.read(timeout=5.0)
                if f is None:
                    return
            if f.index != last_index:
                last_index = f.index
                self._recent.append(f)
            self.stats.fps = self.source.fps
            if time.monotonic() < next_due:
                continue
            next_due = time.monotonic() + self.every
            if self.on_change and not self._changed(f) and \
                    (max_interval is None or time.monotonic() - last_query < max_interval):
                self.stats.skipped_unchanged += 1
                continue
            frames = list(self._recent)[::-1][:: self.window_stride][: self.window][::-1]
            if len(frames) < self.window:  # not enough history yet: repeat the oldest
                frames = [frames[0]] * (self.window - len(frames)) + frames
            last_query = time.monotonic()
            yield from self.ask(frames)


__all__ = ["VideoQuery", "Answer", "QueryStats", "frame_signature"]
