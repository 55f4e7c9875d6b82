"""Gradio web demo (`edge-vila demo BUNDLE`): webcam or upload, a prompt, the answer as it
streams, and live stats (TTFT, tokens/s, resident memory; power on a Jetson).

The webcam streams into the page; "Ask" queries its newest frame (or the uploaded image),
and "Ask every 2 s" keeps asking on a timer, the way the camera verb does.
One model serves the page: queries run one at a time (a lock, concurrency limit 1).
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np

log = logging.getLogger(__name__)


def rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class DemoState:
    def __init__(self, pipe):
        self.pipe = pipe
        self.lock = threading.Lock()
        self.stats_source = None
        try:
            from .jetson.stats import open_stats

            self.stats_source = open_stats()
        except Exception as e:  # not a Jetson
            log.debug("no power stats: %s", e)

    def stats_md(self, ttft: float | None = None, tps: float | None = None) -> str:
        parts = [f"**TTFT** {ttft * 1000:.0f} ms" if ttft is not None else "**TTFT** –",
                 f"**decode** {tps:.1f} tok/s" if tps else "**decode** –",
                 f"**memory** {rss_mb():.0f} MB RSS", f"**backend** {self.pipe.backend.name}"]
        if self.stats_source is not None:
            snap = self.stats_source.snapshot()
            if snap.power_w is not None:
                parts.append(f"**power** {snap.power_w:.1f} W")
        return " · ".join(parts)

    def ask(self, image: np.ndarray | None, prompt: str, max_tokens: int = 48):
        """Generator of (answer so far, stats markdown)."""
        from .generate import SamplingParams

        prompt = (prompt or "").strip() or "Describe the image."
        if image is None and self.pipe.cfg.is_multimodal:
            yield "(no image yet: start the webcam or upload a picture)", self.stats_md()
            return
        images = [np.asarray(image)[..., :3]] if image is not None else []
        with self.lock:
            t0 = time.perf_counter()
            text, first = "", None
            for delta in self.pipe.stream(prompt, images, SamplingParams(max_new_tokens=int(max_tokens))):
                first = first or time.perf_counter() - t0
                text += delta
                yield text, self.stats_md(first)
            st = self.pipe.stats
            yield text, self.stats_md(st.ttft_s, st.decode_tokens_per_s)


def build(pipe):
    import gradio as gr

    state = DemoState(pipe)
    with gr.Blocks(title="edge-vila") as app:
        gr.Markdown(f"## edge-vila · {pipe.cfg.root.name}")
        with gr.Row():
            with gr.Column():
                with gr.Tab("webcam"):
                    cam = gr.Image(sources=["webcam"], type="numpy", label="camera", streaming=True, elem_id="cam")
                with gr.Tab("upload"):
                    upload = gr.Image(sources=["upload"], type="numpy", label="image", elem_id="upload")
                latest = gr.State(None)
                prompt = gr.Textbox(label="prompt", value="How many shapes are there?", elem_id="prompt")
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    auto = gr.Checkbox(label="Ask every 2 s", value=False, elem_id="auto")
                max_tokens = gr.Slider(4, 256, value=48, step=4, label="max new tokens")
            with gr.Column():
                answer = gr.Textbox(label="answer", lines=6, elem_id="answer")
                stats = gr.Markdown(state.stats_md(), elem_id="stats")
        timer = gr.Timer(2.0, active=False)

        def keep(frame):
            return frame

        cam.stream(keep, inputs=cam, outputs=latest, stream_every=0.2, concurrency_limit=None)
        upload.upload(keep, inputs=upload, outputs=latest)
        ask.click(state.ask, inputs=[latest, prompt, max_tokens], outputs=[answer, stats], concurrency_limit=1)
        auto.change(lambda on: gr.Timer(active=on), inputs=auto, outputs=timer)
        timer.tick(state.ask, inputs=[latest, prompt, max_tokens], outputs=[answer, stats], concurrency_limit=1)
    return app


def launch(pipe, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    build(pipe).queue(max_size=16).launch(server_name=host, server_port=port, share=share, show_error=True)


__all__ = ["build", "launch", "DemoState"]
