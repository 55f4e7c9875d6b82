"""The OpenAI-compatible server: API shape, SSE, images, limits, auth, queueing (loopback only)."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")


def _png_data_url(seed=0, size=40) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def client(tiny_bundle):
    from fastapi.testclient import TestClient

    import edge_vila
    from edge_vila.server import ServerOptions, create_app

    pipe = edge_vila.load(tiny_bundle)
    with TestClient(create_app(pipe, ServerOptions(model_id="tiny", max_images=2, max_request_bytes=200_000))) as c:
        yield c


def _chat(client, content, **kw):
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": content}],
                                                     "max_tokens": 8, **kw})


def test_completion_and_stream_agree(client):
    r = _chat(client, "Describe the scene.")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    u = body["usage"]
    assert u["completion_tokens"] >= 1 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    with client.stream("POST", "/v1/chat/completions", json={"model": "tiny", "stream": True, "max_tokens": 8,
                                                             "messages": [{"role": "user", "content": "Describe the scene."}]}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in s.iter_lines() if l.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(l[6:]) for l in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == body["choices"][0]["message"]["content"]  # greedy: same text either way


def test_images_history_and_models(client, tmp_path):
    content = [{"type": "text", "text": "How many shapes are there?"},
               {"type": "image_url", "image_url": {"url": _png_data_url()}}]
    assert _chat(client, content).status_code == 200
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content},
            {"role": "assistant", "content": "two"}, {"role": "user", "content": "And their colours?"}]
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 4})
    assert r.status_code == 200, r.text
    m = client.get("/v1/models").json()
    assert m["data"][0]["id"] == "tiny" and m["data"][0]["accepts_any_model_id"]
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": msgs, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "tiny", r.text  # one model served: any id gets it
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("payload,status,needle", [
    ({"messages": []}, 400, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role must be"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "must follow a user message"),
    ({"model": 9, "messages": [{"role": "user", "content": "hi"}]}, 400, "model must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "unsupported"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     400, "not a decodable image"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]},
     400, "--allow-local-files"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     400, "remote URLs are not fetched"),
])
def test_bad_requests_are_4xx(client, payload, status, needle):
    r = client.post("/v1/chat/completions", json=payload)
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text


def test_limits(client):
    img = {"type": "image_url", "image_url": {"url": _png_data_url(size=16)}}
    r = _chat(client, [{"type": "text", "text": "compare"}, img, img, img])
    assert r.status_code == 400 and "at most 2 images" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", content=b"{" + b" " * 300_000 + b"}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post("/v1/chat/completions", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    r = _chat(client, "word " * 2000)  # beyond the bundle's 512-token context
    assert r.status_code == 400 and r.json()["error"]["type"] == "context_length_exceeded"
    metrics = client.get("/metrics").text
    assert 'edge_vila_requests_total{code="400"}' in metrics and "edge_vila_completion_tokens_total" in metrics


def test_every_status_sent_is_counted(tiny_pipe):
    """The framework's own 404/405 and a 500 from an exception no handler caught are counted
    like the handlers' answers (each request once)."""
    from fastapi.testclient import TestClient

    from edge_vila.server import create_app

    app = create_app(tiny_pipe)
    with TestClient(app, raise_server_exceptions=False) as c:
        def counts() -> dict[str, int]:
            lines = c.get("/metrics").text.splitlines()
            return {ln.split('"')[1]: int(ln.rsplit(" ", 1)[1]) for ln in lines
                    if ln.startswith("edge_vila_requests_total")}

        assert c.get("/no/such/path").status_code == 404
        assert c.get("/v1/chat/completions").status_code == 405
        assert c.post("/v1/chat/completions", content=b"[]").status_code == 400
        app.state.worker.q.qsize = None  # /health now raises: an exception no handler catches
        assert c.get("/health").status_code == 500
        del app.state.worker.q.qsize  # /metrics reads it too
        got = counts()  # rendered before its own 200 is counted
        assert counts().get("200") == 1
    assert (got.get("404"), got.get("405"), got.get("400"), got.get("500")) == (1, 1, 1, 1), got


def test_api_key_and_bind_rules(tiny_bundle):
    from fastapi.testclient import TestClient

    import edge_vila
    from edge_vila.errors import InputError
    from edge_vila.server import ServerOptions, create_app, is_loopback, serve

    pipe = edge_vila.load(tiny_bundle)
    with TestClient(create_app(pipe, ServerOptions(api_key="s3cret"))) as c:
        msg = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert c.post("/v1/chat/completions", json=msg).status_code == 401
        assert c.get("/v1/models").status_code == 401
        assert c.post("/v1/chat/completions", json=msg, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    with pytest.raises(InputError, match="refusing to bind 0.0.0.0 without an API key"):
        serve(pipe, host="0.0.0.0", port=1)


@pytest.fixture(scope="module")
def live_server(tiny_bundle):
    """`edge-vila serve` as a real process on loopback, with a small queue."""
    from edge_vila.testing import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edge_vila", "serve", str(tiny_bundle), "--port", str(port),
                             "--max-queue", "3", "--model-id", "tiny", "--read-timeout", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    from edge_vila.testing import wait_healthy

    if not wait_healthy(url, proc, tries=300):
        proc.kill()
        pytest.fail(f"server did not come up: {proc.stdout.read()}")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def test_concurrent_requests_answered_or_rejected(live_server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Count the shapes."}], "max_tokens": 24}

    def one(_):
        return httpx.post(live_server + "/v1/chat/completions", json=body, timeout=60).status_code

    with cf.ThreadPoolExecutor(20) as ex:
        codes = list(ex.map(one, range(20)))
    assert set(codes) <= {200, 429}, codes  # no 5xx, no hang
    assert codes.count(200) >= 4  # the worker + a queue of 3 at least
    for _ in range(20):  # and it keeps serving sequentially afterwards
        assert one(0) == 200


def _metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


_BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Count the shapes."}], "max_tokens": 8}


def test_stalled_body_gets_408_and_does_not_hold_the_server(live_server):
    port = int(live_server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 500\r\n\r\n{\"model\": \"tiny\", ")  # 480 bytes never come
        t0 = time.monotonic()
        ok = httpx.post(live_server + "/v1/chat/completions", json=_BODY, timeout=30)
        assert ok.status_code == 200  # served while the other connection stalls
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert 1.5 <= time.monotonic() - t0 < 12  # --read-timeout 2
    err = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert err["type"] == "timeout" and err["code"] == 408
    assert _metrics(live_server).get('edge_vila_requests_total{code="408"}', 0) >= 1


def test_client_that_disconnects_mid_stream_frees_the_worker(live_server):
    url = live_server + "/v1/chat/completions"
    with httpx.stream("POST", url, json={**_BODY, "stream": True, "max_tokens": 300}, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content": ""' not in line and '"content":""' not in line:
                break  # the first generated token: hang up here
    for _ in range(100):  # the worker notices at its next token and stops
        m = _metrics(live_server)
        if m["edge_vila_busy"] == 0:
            break
        time.sleep(0.1)
    assert m["edge_vila_busy"] == 0
    assert httpx.post(url, json=_BODY, timeout=30).status_code == 200  # the next request is served
    assert not [k for k in _metrics(live_server) if k.startswith('edge_vila_requests_total{code="5')]


def test_json_that_python_accepts_but_is_not_json_gets_400(client):
    """NaN/Infinity (Python's parser takes them, and NaN passed every range check: the sampler
    raised on NaN probabilities, a 500) and bodies nested past the recursion limit."""
    base = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2'
    for raw, needle in ((base + ', "temperature": NaN}', "NaN"), (base + ', "top_p": Infinity}', "Infinity"),
                        ('{"messages": ' + "[" * 5000 + "]" * 5000 + "}", "nested")):
        r = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (r.status_code, r.text[:200])
    from edge_vila.errors import InputError
    from edge_vila.generate import SamplingParams

    for bad in ({"temperature": float("nan")}, {"temperature": float("inf")}, {"repetition_penalty": float("nan")}):
        with pytest.raises(InputError):
            SamplingParams(**bad)
