"""Property-based fuzzing (hypothesis) of what a client or a camera hands us: the server's
request parsing and the image decoder. Thousands of generated inputs; each either works or
fails with our own one-line error (the server: a 4xx with an OpenAI-style body) — never another
exception, never a 5xx."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edge_vila.errors import InputError
from edge_vila.preprocess import load_image
from edge_vila.server import ApiError, ServerOptions, parse_request

OPTS = ServerOptions(max_images=2, allow_local_files=False)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=20)


def _png(size=(6, 5), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 120).save(buf, fmt)
    return buf.getvalue()


SEEDS = [_png(), _png(mode="RGBA"), _png(mode="P", fmt="GIF"), _png(fmt="JPEG"), _png(mode="L", fmt="WEBP"),
         _png(mode="I;16")]
data_url = st.sampled_from(SEEDS).map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode())
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30) | json_values}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": st.fixed_dictionaries({"url": data_url | st.text(max_size=40)})
                           | json_values}),
    json_values)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", ""]) | json_values},
    optional={"content": st.text(max_size=30) | st.lists(part, max_size=3) | json_values})
sampling = st.dictionaries(st.sampled_from(["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                                            "repetition_penalty", "stop", "seed", "stream", "model"]),
                           json_values, max_size=5)
bodies = st.builds(lambda msgs, extra: {"messages": msgs, **extra}, st.lists(message, max_size=4) | json_values,
                   sampling) | json_values


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_request_parsing_accepts_or_refuses_with_a_4xx(body):
    if not isinstance(body, dict):
        return  # the app refuses a non-object body before parsing (below)
    try:
        req = parse_request(body, OPTS)
    except ApiError as e:
        assert 400 <= e.status < 500 and e.body()["error"]["message"]
        return
    assert req.message is not None and len(req.images) <= OPTS.max_images
    assert req.params.max_new_tokens <= OPTS.max_tokens_cap


@pytest.fixture(scope="module")
def client(tiny_pipe):
    from fastapi.testclient import TestClient

    from edge_vila.server import create_app

    with TestClient(create_app(tiny_pipe, ServerOptions(model_id="tiny", max_images=2, max_tokens_cap=2,
                                                        max_request_bytes=100_000))) as c:
        yield c


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda v: json.dumps(v).encode(), bodies),
    st.builds(lambda b, cut: json.dumps(b).encode()[:cut], bodies, st.integers(0, 60)),  # truncated JSON
    st.sampled_from([b"NaN", b"[" * 5000, b'{"messages": Infinity}', b"\xff\xfe{}", b'{"a":1e999999}']))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(raw_bodies)
def test_the_server_never_answers_5xx_to_what_a_client_sends(client, raw):
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, (raw[:200], r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert r.json()["error"]["message"]


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       st.integers(0, 10_000))
def test_mutated_images_decode_or_fail_with_one_line(seed, flips, cut):
    """Valid PNG/GIF/JPEG/WebP files with bytes flipped and tails cut: an RGB picture or an
    InputError (a clear line for the CLI's exit 2 and the server's 400/413), nothing else."""
    data = bytearray(seed)
    for at, value in flips:
        data[at % len(data)] = value
    data = bytes(data[: max(1, len(data) - cut % len(data))])
    try:
        im = load_image(data)
    except InputError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert im.mode == "RGB" and im.size[0] >= 1 and im.size[1] >= 1
    np.asarray(im)  # the pixels are really there


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_refused_as_images_with_one_line(data):
    try:
        load_image(data)
    except InputError as e:
        assert str(e)
