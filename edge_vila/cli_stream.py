"""Streaming verbs of `edge-vila`: camera, serve, demo."""
from __future__ import annotations

import argparse
import os
import sys


def _load(a: argparse.Namespace):
    from . import load
    from .options import RuntimeOptions

    return load(a.path, RuntimeOptions.from_args(a))


def cmd_camera(a: argparse.Namespace) -> int:
    from .camera import run_camera
    from .generate import SamplingParams
    from .video import open_source

    pipe = _load(a)
    src = open_source(a.input)
    output = None if a.headless else a.output
    run_camera(pipe, src, a.prompt, output, every=a.every, on_change=a.on_change, window=a.window,
               params=SamplingParams(max_new_tokens=a.max_new_tokens), max_queries=a.max_queries,
               duration=a.duration, status=not a.no_status)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from .server import ServerOptions, check_bind, serve

    opts = ServerOptions(model_id=a.model_id or os.path.basename(os.path.normpath(a.path)),
                         api_key=a.api_key or os.environ.get("EDGE_VILA_API_KEY"),
                         allow_local_files=a.allow_local_files, max_images=a.max_images, max_queue=a.max_queue,
                         max_request_bytes=a.max_request_mb << 20, strict_model=a.strict_model,
                         read_timeout_s=a.read_timeout)
    check_bind(a.host, opts.api_key)  # say it before spending time on loading
    pipe = _load(a)
    ids = "other model ids are refused" if opts.strict_model else "a request for any model id gets it"
    print(f"edge-vila: serving {opts.model_id!r} at http://{a.host}:{a.port}/v1 (OpenAI-compatible; {ids}; "
          "Ctrl-C stops)", file=sys.stderr, flush=True)
    serve(pipe, a.host, a.port, opts)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import launch

    launch(_load(a), host=a.host, port=a.port, share=False)
    return 0


def _common(s: argparse.ArgumentParser) -> None:
    from .options import add_runtime_args

    s.add_argument("path", help="bundle (or checkpoint)")
    add_runtime_args(s)


def register(sub) -> None:
    s = sub.add_parser("camera", help="ask about a live video source: INPUT_URI [OUTPUT_URI]")
    _common(s)
    s.add_argument("input", help="v4l2:///dev/video0, csi://0, rtsp://..., file.mp4, folder/, synthetic://shapes")
    s.add_argument("output", nargs="?", default=None, help="out.mp4, frames/, display://0 (default: none)")
    s.add_argument("--prompt", required=True, help="the question (or instruction) for the model")
    s.add_argument("--every", type=float, default=2.0, help="seconds between queries")
    s.add_argument("--on-change", action="store_true", help="ask only when the scene changes")
    s.add_argument("--window", type=int, default=1, help="frames per query (the last K, as K images)")
    s.add_argument("--max-new-tokens", type=int, default=32, help="most tokens per answer")
    s.add_argument("--max-queries", type=int, default=None,
                   help="stop after this many answers (default: run until the source ends or Ctrl-C)")
    s.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    s.add_argument("--headless", action="store_true", help="no output video/window, answers only")
    s.add_argument("--no-status", action="store_true", help="no status line (capture fps, TTFT, tok/s) on stderr")
    s.set_defaults(fn=cmd_camera)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (loopback by default)")
    _common(s)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (127.0.0.1: this machine only; another address needs an API key)")
    s.add_argument("--port", type=int, default=8000, help="TCP port")
    s.add_argument("--api-key", default=None, help="required to bind a non-loopback address")
    s.add_argument("--model-id", default=None, help="the id /v1/models lists (default: the bundle's folder name)")
    s.add_argument("--strict-model", action="store_true", help="answer 404 to requests naming another model id "
                   "(default: one model is served, so any id gets it)")
    s.add_argument("--allow-local-files", action="store_true", help="accept image_url file paths")
    s.add_argument("--max-images", type=int, default=4, help="images per request at most")
    s.add_argument("--max-queue", type=int, default=8, help="requests waiting for the model at most; more get 429 (a request that waited over 60 s, 503)")
    s.add_argument("--max-request-mb", type=int, default=16,
                   help="largest request body, in MiB (images included, base64)")
    s.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive; a slower one gets 408")
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("demo", help="gradio web demo: webcam or upload, streaming answers, live stats")
    _common(s)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (127.0.0.1: this machine only; another address needs an API key)")
    s.add_argument("--port", type=int, default=7860, help="TCP port of the web demo")
    s.set_defaults(fn=cmd_demo)
