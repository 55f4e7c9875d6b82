"""TensorRT on the device: build engines from the tiny bundle and compare with ONNX Runtime.

These need a Jetson (or an NVIDIA GPU) with TensorRT >= 10 and cuda-python; elsewhere they
skip and say why. Run on a Jetson with `pytest -m gpu`.
"""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _need_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        pytest.skip(f"needs TensorRT (not importable here: {e}); run on a Jetson with `pytest -m gpu`")
    try:
        from edge_vila.backends.cuda_mem import open_runtime

        open_runtime()
    except Exception as e:
        pytest.skip(f"needs a CUDA device and driver ({e})")


@pytest.fixture(scope="module")
def engines(tiny_bundle):
    _need_tensorrt()
    from edge_vila.export.trt_build import BuildOptions, build_engines

    return build_engines(tiny_bundle, BuildOptions(precision="auto", max_context=256, max_prefill=128))


def test_tensorrt_matches_onnxruntime(tiny_bundle, engines):
    import edge_vila

    trt_pipe = edge_vila.load(tiny_bundle, backend="tensorrt")
    ort_pipe = edge_vila.load(tiny_bundle, backend="onnxruntime", exact=True)
    rng = np.random.default_rng(0)
    img = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    from edge_vila.preprocess import preprocess_images

    pixels = preprocess_images([img], trt_pipe.cfg.preprocess)
    a, b = trt_pipe.backend.encode_images(pixels), ort_pipe.backend.encode_images(pixels)
    assert np.abs(a - b).max() / np.abs(b).max() < 2e-2  # FP16 + INT8 engines vs float ORT
    emb = ort_pipe.backend.embed(rng.integers(0, 200, 40))
    la, lb = trt_pipe.backend.forward(emb, 0), ort_pipe.backend.forward(emb, 0)
    assert np.abs(la - lb).max() / np.abs(lb).max() < 2e-2
    for pos in range(40, 60):  # decode profile, CUDA graphs from the second visit of a position
        tok = emb[:1]
        la, lb = trt_pipe.backend.forward(tok, pos), ort_pipe.backend.forward(tok, pos)
        assert np.abs(la - lb).max() / np.abs(lb).max() < 2e-2


def test_greedy_tokens_equal_and_graph_replay(tiny_bundle, engines):
    import edge_vila
    from edge_vila.generate import SamplingParams

    pipe = edge_vila.load(tiny_bundle, backend="tensorrt")
    p = SamplingParams(max_new_tokens=16)
    first = pipe.generate("describe the scene", params=p).text
    second = pipe.generate("describe the scene", params=p).text  # same positions: graphs replayed
    assert first == second
