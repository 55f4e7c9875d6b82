"""Hostile and unusual images: each gives a valid RGB image or one clear error, never a
traceback (edge_vila.preprocess.load_image, the CLI and the server share it)."""
from __future__ import annotations

import base64
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from edge_vila.errors import ImageTooLargeError, InputError
from edge_vila.preprocess import load_image, preprocess_image
from edge_vila.testing import bomb_png


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    with pytest.raises(ImageTooLargeError, match=r"60000x60000 is 3600 MP, above the limit of 64 MP"):
        load_image(bomb_png())
    f = tmp_path / "bomb.png"
    f.write_bytes(bomb_png())
    with pytest.raises(ImageTooLargeError, match="bomb.png"):
        load_image(f)
    small = _png(Image.new("RGB", (20, 20)))
    with pytest.raises(ImageTooLargeError, match="limit of 0.0001 MP"):
        load_image(small, max_pixels=100)
    assert load_image(small).size == (20, 20)  # the limit was the call's, not the process's


def test_two_pipelines_keep_their_own_pixel_limits(tiny_ckpt):
    """max_pixels is a pipeline's option (it used to be one process-wide setting: the last
    load's limit held for every pipeline)."""
    import edge_vila

    strict = edge_vila.load(tiny_ckpt, max_pixels=100)
    loose = edge_vila.load(tiny_ckpt)
    img = _png(Image.new("RGB", (40, 40), (200, 30, 30)))  # encoded: the limit is checked before decoding
    with pytest.raises(ImageTooLargeError, match="max_pixels"):
        strict.generate("What is it?", images=[img], max_new_tokens=2)
    assert isinstance(loose.generate("What is it?", images=[img], max_new_tokens=2), str)


def test_unusual_modes_become_rgb():
    cases = {
        "cmyk jpeg": (_png(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), format="JPEG"), (255, 0, 0)),
        "16-bit grey": (_png(Image.fromarray(np.full((6, 8), 32896, np.uint16))), (128, 128, 128)),
        "palette + transparency": (_png(Image.new("P", (8, 6), 0), transparency=0), None),
        "rgba": (_png(Image.new("RGBA", (8, 6), (10, 20, 30, 0))), (10, 20, 30)),
        "grey + alpha": (_png(Image.new("LA", (8, 6), (90, 255))), (90, 90, 90)),
        "grey": (_png(Image.new("L", (8, 6), 200)), (200, 200, 200)),
    }
    for name, (raw, colour) in cases.items():
        img = load_image(raw)
        assert img.mode == "RGB" and img.size == (8, 6), name
        if colour is not None:
            np.testing.assert_allclose(np.asarray(img)[3, 4], colour, atol=3, err_msg=name)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    got = load_image(_png(img, format="JPEG", exif=exif.tobytes(), quality=95))
    assert got.size == (20, 40)
    assert np.asarray(got)[2, 10, 2] > 200  # the blue left edge is now at the top


def test_animated_gif_gives_its_first_frame(caplog):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    with caplog.at_level("INFO", logger="edge_vila.preprocess"):
        img = load_image(buf.getvalue())
    assert tuple(np.asarray(img)[4, 4]) == (255, 0, 0) and "animated (3 frames)" in caplog.text


def test_truncated_tiny_and_extreme_images(tmp_path):
    from edge_vila.config import PreprocessSpec
    from edge_vila.preprocess import image_tiles

    raw = _png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(InputError, match="not a readable image"):
        load_image(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="is a directory"):
        load_image(tmp_path)
    spec = PreprocessSpec(height=32, width=32, mean=[0.5] * 3, std=[0.5] * 3)
    for size in ((1, 1), (4000, 3), (3, 4000)):
        assert preprocess_image(np.zeros((size[1], size[0], 3), np.uint8), spec).shape == (3, 32, 32)
    dyn = PreprocessSpec(height=32, width=32, mean=[0.5] * 3, std=[0.5] * 3, mode="dynamic", max_tiles=12)
    assert image_tiles(np.zeros((3, 4000, 3), np.uint8), dyn).shape == (13, 3, 32, 32)  # 12x1 + thumbnail


def test_cli_refuses_a_bomb_in_one_line(tiny_bundle, tmp_path):
    f = tmp_path / "bomb.png"
    f.write_bytes(bomb_png())
    r = subprocess.run([sys.executable, "-m", "edge_vila", "run", str(tiny_bundle), "--image", str(f), "--prompt", "hi",
                        "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "above the limit of 64 MP" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_server_answers_413_for_a_bomb_and_counts_it(tiny_bundle):
    from fastapi.testclient import TestClient

    import edge_vila
    from edge_vila.server import ServerOptions, create_app

    client = TestClient(create_app(edge_vila.load(tiny_bundle), ServerOptions(model_id="tiny")))
    url = "data:image/png;base64," + base64.b64encode(bomb_png()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 413 and "above the limit" in r.json()["error"]["message"], r.text
    truncated = "data:image/png;base64," + base64.b64encode(bomb_png()[:30]).decode()
    body["messages"][0]["content"][1]["image_url"]["url"] = truncated
    assert client.post("/v1/chat/completions", json=body).status_code == 400
    metrics = client.get("/metrics").text
    assert 'code="413"' in metrics and 'code="400"' in metrics
