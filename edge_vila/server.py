"""`edge-vila serve BUNDLE`: an OpenAI-compatible HTTP server (FastAPI + uvicorn).

    POST /v1/chat/completions   text + image_url (data: URLs; local paths only with
                                --allow-local-files), SSE streaming with "stream": true
    GET  /v1/models  /health  /metrics (Prometheus text format)

Safety by default: binds 127.0.0.1; binding any other address requires an API key
(`Authorization: Bearer KEY`). One model generates one request at a time: requests wait in
a bounded queue and get 429 when it is full, 503 when they waited too long, 413/400 for
oversized bodies, too many images, bad fields or prompts beyond the context, 408 for a body
that does not arrive within `read_timeout_s`. A slow or stalled client holds only its own
connection (the event loop serves the others; generation runs on its own thread), and a
streaming client that disconnects stops its generation at the next token.
"""

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ContextOverflowError, EdgeVilaError, InputError
from .generate import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class ServerOptions:
    model_id: str = "edge-vila"
    # one model is served: any requested id gets it (clients often send their default, e.g.
    # "gpt-4o"), as /v1/models says; strict_model refuses ids other than model_id with 404
    strict_model: bool = False
    api_key: str | None = None
    allow_local_files: bool = False
    max_request_bytes: int = 16 << 20
    max_images: int = 4
    max_tokens_cap: int = 1024
    max_queue: int = 8
    queue_timeout_s: float = 60.0
    read_timeout_s: float = 30.0  # the whole request body must arrive within this
    max_pixels: int | None = None  # images claiming more are refused with 413 (default: the pipeline's)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def _no_constants(name: str):
    """NaN / Infinity are not JSON (Python's parser takes them): refuse them by name."""
    raise ApiError(400, f"body holds {name}, which is not JSON")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---- request parsing ------------------------------------------------------------------

def _image(url: str, opts: ServerOptions):
    from .errors import ImageTooLargeError
    from .preprocess import load_image

    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if ";base64" not in head or not head[5:].startswith("image/"):
            raise ApiError(400, "image_url data URLs must be data:image/...;base64,...", param="image_url")
        try:
            src = base64.b64decode(payload, validate=True)
        except ValueError as e:
            raise ApiError(400, f"image_url: not valid base64 ({e})", param="image_url") from None
    else:
        if url.startswith(("http://", "https://")):
            raise ApiError(400, "image_url: remote URLs are not fetched; send a data: URL", param="image_url")
        if not opts.allow_local_files:
            raise ApiError(400, "image_url: local file paths need the server's --allow-local-files flag",
                           param="image_url")
        src = Path(url[len("file://"):] if url.startswith("file://") else url)
    try:
        return load_image(src, opts.max_pixels)  # the pixel limit is checked from the header, before decoding
    except ImageTooLargeError as e:
        raise ApiError(413, f"image_url: {e}", param="image_url") from None
    except InputError as e:
        raise ApiError(400, f"image_url: not a decodable image ({e})", param="image_url") from None


def _content(content: Any, opts: ServerOptions, images: list) -> str:
    """OpenAI content (string or parts) -> text with <image> markers where images were."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, "messages[].content must be a string or a list of parts", param="messages")
    text = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text.append(str(part.get("text", "")))
        elif kind == "image_url":
            iu = part.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            if not isinstance(url, str):
                raise ApiError(400, "image_url.url must be a string", param="image_url")
            images.append(_image(url, opts))
            if len(images) > opts.max_images:
                raise ApiError(400, f"at most {opts.max_images} images per request", param="messages")
            text.append("<image>")
        else:
            raise ApiError(400, f"content part type {kind!r} unsupported (expected text or image_url)",
                           param="messages")
    return "\n".join(t for t in text if t)


@dataclass
class ChatRequest:
    system: str | None
    history: list[tuple[str, list, str]]  # (user text, images, assistant text)
    message: str
    images: list
    params: SamplingParams
    stream: bool


def parse_request(body: dict, opts: ServerOptions) -> ChatRequest:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    system, turns, pending = None, [], None
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant", param="messages")
        imgs: list = []
        text = _content(m.get("content", ""), opts, imgs)
        if m["role"] in ("system", "developer"):
            if imgs:
                raise ApiError(400, "system messages cannot hold images", param="messages")
            system = text if system is None else system + "\n" + text
        elif m["role"] == "user":
            if pending is not None:  # two user messages in a row: join them
                pending = (pending[0] + "\n" + text, pending[1] + imgs)
            else:
                pending = (text, imgs)
        else:
            if pending is None:
                raise ApiError(400, f"messages[{i}]: an assistant message must follow a user message",
                               param="messages")
            turns.append((pending[0], pending[1], text))
            pending = None
    if pending is None:
        raise ApiError(400, "the last message must be from the user", param="messages")
    n_images = sum(len(t[1]) for t in turns) + len(pending[1])
    if n_images > opts.max_images:
        raise ApiError(400, f"at most {opts.max_images} images per request, got {n_images}", param="messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 128))
    stop = body.get("stop") or ()
    try:
        params = SamplingParams(max_new_tokens=min(int(max_tokens), opts.max_tokens_cap),
                                temperature=float(body.get("temperature", 0.0) or 0.0),
                                top_p=float(body.get("top_p", 1.0)), top_k=int(body.get("top_k", 0)),
                                repetition_penalty=float(body.get("repetition_penalty", 1.0)),
                                stop=(stop,) if isinstance(stop, str) else tuple(stop), seed=body.get("seed"))
    except (TypeError, ValueError) as e:
        raise ApiError(400, f"sampling parameters: {e}") from None
    except InputError as e:
        raise ApiError(400, str(e)) from None
    return ChatRequest(system, turns, pending[0], pending[1], params, bool(body.get("stream", False)))


# ---- the single generation worker ----------------------------------------------------------

@dataclass
class Job:
    req: ChatRequest
    emit: Any                      # thread-safe callback(kind, payload)
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[int, int] = {}
        self.prompt_tokens = self.completion_tokens = self.reused_tokens = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.busy = 0

    def count(self, status: int) -> None:
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1

    def render(self, queue_depth: int) -> str:
        with self.lock:
            out = ["# TYPE edge_vila_requests_total counter"]
            out += [f'edge_vila_requests_total{{code="{c}"}} {n}' for c, n in sorted(self.requests.items())]
            out += ["# TYPE edge_vila_prompt_tokens_total counter", f"edge_vila_prompt_tokens_total {self.prompt_tokens}",
                    "# TYPE edge_vila_reused_prompt_tokens_total counter",
                    f"edge_vila_reused_prompt_tokens_total {self.reused_tokens}",
                    "# TYPE edge_vila_completion_tokens_total counter",
                    f"edge_vila_completion_tokens_total {self.completion_tokens}",
                    "# TYPE edge_vila_ttft_seconds summary", f"edge_vila_ttft_seconds_sum {self.ttft_sum:.6f}",
                    f"edge_vila_ttft_seconds_count {self.ttft_count}",
                    "# TYPE edge_vila_queue_depth gauge", f"edge_vila_queue_depth {queue_depth}",
                    "# TYPE edge_vila_busy gauge", f"edge_vila_busy {self.busy}"]
        return "\n".join(out) + "\n"


class CountStatuses:
    """ASGI middleware: every status the server sends is counted in /metrics - the handlers'
    own answers, the framework's 404/405, and a 500 from an exception no handler caught (counted
    here; the framework's outer error handler then sends it). Pure ASGI, not BaseHTTPMiddleware:
    that would sit between a streaming response and the client's disconnect."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:
                self.metrics.count(500)
            raise


class Worker:
    """Runs jobs one at a time on a thread (one model, one KV cache)."""

    def __init__(self, pipe, opts: ServerOptions, metrics: Metrics):
        self.pipe, self.opts, self.metrics = pipe, opts, metrics
        self.q: queue.Queue[Job | None] = queue.Queue(maxsize=opts.max_queue)
        self._t = threading.Thread(target=self._run, name="generate", daemon=True)
        self._t.start()

    def submit(self, job: Job) -> None:
        try:
            self.q.put_nowait(job)
        except queue.Full:
            raise ApiError(429, f"server busy: {self.opts.max_queue} requests already queued; retry later",
                           kind="rate_limit_error") from None

    def close(self) -> None:
        self.q.put(None)
        self._t.join(timeout=10)

    def _chat(self, req: ChatRequest):
        from .api import Turn

        return self.pipe.chat(system=req.system,
                              history=[Turn(user, reply, imgs) for user, imgs, reply in req.history])

    def _run(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            if time.monotonic() - job.enqueued > self.opts.queue_timeout_s:
                job.emit("error", ApiError(503, "request waited too long in the queue", kind="server_busy"))
                continue
            self.metrics.busy = 1
            try:
                chat = self._chat(job.req)
                for delta in chat.stream(job.req.message, job.req.images, job.req.params):
                    if job.cancelled.is_set():
                        break
                    job.emit("delta", delta)
                st = self.pipe.stats
                with self.metrics.lock:
                    self.metrics.prompt_tokens += st.prompt_tokens
                    self.metrics.reused_tokens += st.reused_tokens
                    self.metrics.completion_tokens += st.new_tokens
                    self.metrics.ttft_sum += st.ttft_s
                    self.metrics.ttft_count += 1
                job.emit("done", st)
            except ContextOverflowError as e:
                job.emit("error", ApiError(400, str(e), kind="context_length_exceeded"))
            except ApiError as e:
                job.emit("error", e)
            except EdgeVilaError as e:
                job.emit("error", ApiError(400, str(e)))
            except Exception as e:  # a bug: report it as a 500, keep serving
                log.exception("generation failed")
                job.emit("error", ApiError(500, f"internal error: {type(e).__name__}", kind="server_error"))
            finally:
                self.metrics.busy = 0


# ---- the app -------------------------------------------------------------------------------

def create_app(pipe, opts: ServerOptions | None = None):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    opts = opts or ServerOptions()
    if opts.max_pixels is None:
        opts = dataclasses.replace(opts, max_pixels=pipe.options.max_pixels)
    metrics = Metrics()
    worker = Worker(pipe, opts, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    app = FastAPI(title="edge-vila", version="1", lifespan=lifespan)
    app.add_middleware(CountStatuses, metrics=metrics)
    app.state.worker = worker
    created = int(time.time())

    def fail(e: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def check_auth(request: Request) -> None:
        if opts.api_key and request.headers.get("authorization") != f"Bearer {opts.api_key}":
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error")

    @app.get("/health")
    def health():
        return {"status": "ok", "model": opts.model_id, "queue": worker.q.qsize(), "busy": bool(metrics.busy)}

    @app.get("/metrics")
    def prom():
        return PlainTextResponse(metrics.render(worker.q.qsize()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models(request: Request):
        try:
            check_auth(request)
        except ApiError as e:
            return fail(e)
        return {"object": "list", "data": [{"id": opts.model_id, "object": "model", "created": created,
                                            "owned_by": "edge-vila", "accepts_any_model_id": not opts.strict_model}]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        try:
            check_auth(request)
            size = int(request.headers.get("content-length") or 0)
            if size > opts.max_request_bytes:
                raise ApiError(413, f"request body {size} bytes exceeds {opts.max_request_bytes}")
            try:
                raw = await asyncio.wait_for(request.body(), opts.read_timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(408, f"request body not received within {opts.read_timeout_s:g} s",
                               kind="timeout") from None
            if len(raw) > opts.max_request_bytes:
                raise ApiError(413, f"request body exceeds {opts.max_request_bytes} bytes")
            try:
                body = json.loads(raw, parse_constant=_no_constants)
            except json.JSONDecodeError as e:
                raise ApiError(400, f"body is not JSON ({e})") from None
            except UnicodeDecodeError as e:  # json.loads decodes bytes as UTF-8/16/32 (found by test_fuzz.py)
                raise ApiError(400, f"body is not UTF-8 JSON (byte {e.start}: {e.reason})") from None
            except RecursionError:
                raise ApiError(400, "body is nested too deeply") from None
            if not isinstance(body, dict):
                raise ApiError(400, "body must be a JSON object")
            if body.get("model") is not None and not isinstance(body["model"], str):
                raise ApiError(400, "model must be a string (the served model's id, or any id)", param="model")
            if opts.strict_model and body.get("model") not in (None, opts.model_id):
                raise ApiError(404, f"model {body.get('model')!r} not served here (this server has {opts.model_id!r})",
                               param="model")
            req = await asyncio.to_thread(parse_request, body, opts)
        except ApiError as e:
            return fail(e)
        except Exception as e:  # a bug in parsing: a counted 500 with the cause in the log, not a bare one
            log.exception("request parsing failed")
            return fail(ApiError(500, f"internal error: {type(e).__name__}", kind="server_error"))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(req, lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)))
        try:
            worker.submit(job)
        except ApiError as e:
            return fail(e)
        cid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        if not req.stream:
            text = ""
            try:
                while True:
                    kind, payload = await events.get()
                    if kind == "delta":
                        text += payload
                    elif kind == "error":
                        return fail(payload)
                    else:
                        break
            except asyncio.CancelledError:
                job.cancelled.set()
                raise
            st = payload
            return {"id": cid, "object": "chat.completion", "created": now, "model": opts.model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "length" if st.finish_reason == "length" else "stop"}],
                    "usage": {"prompt_tokens": st.prompt_tokens, "completion_tokens": st.new_tokens,
                              "total_tokens": st.prompt_tokens + st.new_tokens}}

        try:
            first = await events.get()  # errors before the first token still get a proper status code
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if first[0] == "error":
            return fail(first[1])

        def chunk(delta: dict, finish: str | None = None) -> str:
            return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": now,
                                          "model": opts.model_id,
                                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

        async def sse():
            kind, payload = first
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    if kind == "delta":
                        yield chunk({"content": payload})
                    elif kind == "error":
                        yield "data: " + json.dumps(payload.body()) + "\n\n"
                        break
                    else:
                        yield chunk({}, "length" if payload.finish_reason == "length" else "stop")
                        break
                    kind, payload = await events.get()
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()  # client went away mid-stream: stop generating

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def check_bind(host: str, api_key: str | None) -> None:
    """Loopback by default: any other address needs an API key."""
    if not is_loopback(host) and not api_key:
        raise InputError(f"refusing to bind {host} without an API key: pass --api-key (or EDGE_VILA_API_KEY), "
                         "or bind 127.0.0.1")


def serve(pipe, host: str = "127.0.0.1", port: int = 8000, opts: ServerOptions | None = None) -> None:
    import uvicorn

    opts = opts or ServerOptions()
    check_bind(host, opts.api_key)
    uvicorn.run(create_app(pipe, opts), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)


__all__ = ["ServerOptions", "create_app", "serve", "check_bind", "parse_request", "ApiError", "is_loopback"]
