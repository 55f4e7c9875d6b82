"""Our INT4 linear op (backends/csrc/int4_linear.c): the packed layout and both kernels
(AVX-512 VNNI and the portable loops) against a numpy model of the same maths, through ctypes
and as an ONNX Runtime node, plus its errors and its thread pool."""
from __future__ import annotations

import platform

import numpy as np
import pytest

from edge_vila.backends.native_ops import build_library, int4_linear, int4_linear_native, set_threads
from edge_vila.backends.ort_fast import Int4Linear, pack_int4_tiles

X86 = platform.machine() in ("x86_64", "AMD64")


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    native = build_library(tmp_path_factory.mktemp("ops"))
    out = {"native": native}
    if X86:
        out["portable"] = build_library(tmp_path_factory.mktemp("ops_portable"), portable=True)
    return out


def _linear(rng, K, N, bs):
    nb = -(-K // bs)
    return Int4Linear(rng.integers(0, 16, (K, N), dtype=np.uint8), rng.uniform(1e-3, 2e-2, (nb, N)).astype(np.float32),
                      rng.integers(0, 16, (nb, N), dtype=np.uint8), bs)


def _reference(lin: Int4Linear, x: np.ndarray, swiglu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(the op's maths: int8 activations per block, exact integer dot, float per-block scaling;
    the plain float product with the dequantized weights)"""
    K, N = lin.kn
    bs = lin.block
    if swiglu:
        x = x[..., :K] / (1 + np.exp(-x[..., :K])) * x[..., K:]
    x = x.reshape(-1, K).astype(np.float64)
    nb = -(-K // bs)
    w = lin.q.astype(np.int64) - np.repeat(lin.zero, bs, 0)[:K].astype(np.int64)  # [K, N]
    scale = lin.scale.astype(np.float64)
    y = np.zeros((len(x), N))
    for b in range(nb):
        xb = x[:, b * bs:(b + 1) * bs]
        amax = np.abs(xb).max(1, keepdims=True)
        s = (amax / 127).astype(np.float32).astype(np.float64)
        q = np.clip(np.rint(xb * np.where(amax > 0, 127 / np.where(amax > 0, amax, 1), 0)), -127, 127)
        y += (q @ w[b * bs:(b + 1) * bs]) * scale[b] * s
    wf = w * np.repeat(scale, bs, 0)[:K]
    return y, x @ wf


@pytest.mark.parametrize("K,N,bs,M", [(576, 1000, 128, 1), (576, 37, 128, 13), (256, 64, 32, 5), (100, 20, 32, 3),
                                      (1280, 48, 64, 1)])
@pytest.mark.parametrize("kind", ["native", "native-portable-loops", "portable"])
def test_matches_reference(libs, kind, K, N, bs, M):
    """Odd K (a short last block) and N (a partial last tile), one row (decode's kernel) and
    13 rows (prefill's 8 + 4 + 1 row groups), with a bias."""
    if kind == "portable" and "portable" not in libs:
        pytest.skip("-mno-avx512f is an x86 flag; elsewhere the native build is the portable one")
    lib = libs["portable" if kind == "portable" else "native"]
    rng = np.random.default_rng(K + N + M)
    lin = _linear(rng, K, N, bs)
    x = rng.standard_normal((M, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    y = int4_linear(lib, x, pack_int4_tiles(lin), K, N, bs, bias, portable=kind == "native-portable-loops")
    same, plain = _reference(lin, x)
    assert y.shape == (M, N)
    assert np.abs(y - bias - same).max() <= 1e-5 * np.abs(same).max()
    assert np.abs(y - bias - plain).max() <= 0.02 * np.abs(plain).max()  # int8 activations: ~0.5% here


def test_swiglu_input_and_leading_dims(libs):
    rng = np.random.default_rng(1)
    K, N, bs = 192, 40, 64
    lin = _linear(rng, K, N, bs)
    x = rng.standard_normal((1, 3, 2 * K)).astype(np.float32)  # gate | up, batch and sequence dims
    y = int4_linear(libs["native"], x, pack_int4_tiles(lin), K, N, bs, swiglu=True)
    same, _ = _reference(lin, x, swiglu=True)
    assert y.shape == (1, 3, N)
    assert np.abs(y.reshape(-1, N) - same).max() <= 1e-5 * np.abs(same).max()
    with pytest.raises(ValueError, match="expected 384"):
        int4_linear(libs["native"], x[..., :K], pack_int4_tiles(lin), K, N, bs, swiglu=True)


def test_thread_pool_gives_the_same_numbers(libs):
    """Every output tile is computed whole by one thread, so any split gives identical bits."""
    rng = np.random.default_rng(2)
    K, N, bs = 512, 4096, 128
    lin, lib = _linear(rng, K, N, bs), libs["native"]
    packed = pack_int4_tiles(lin)
    x = rng.standard_normal((9, K)).astype(np.float32)
    try:
        assert set_threads(lib, 1) == 1
        one = [int4_linear(lib, x[:m], packed, K, N, bs) for m in (1, 9)]
        assert set_threads(lib, 4) == 4  # more threads than cores still works
        for _ in range(20):  # repeated hand-offs: no lost or doubled chunk
            four = [int4_linear(lib, x[:m], packed, K, N, bs) for m in (1, 9)]
            assert all(np.array_equal(a, b) for a, b in zip(one, four))
    finally:
        set_threads(lib, 0)


def test_native_kernel_is_reported(libs):
    flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
    assert int4_linear_native(libs["native"]) == ("avx512_vnni" in flags and "avx512bw" in flags)
    if "portable" in libs:
        assert not int4_linear_native(libs["portable"])


def test_as_an_onnx_runtime_node(libs):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    K, N, bs = 160, 50, 32
    lin = _linear(rng, K, N, bs)
    W, sc, zp = pack_int4_tiles(lin)
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(sc, "scales"), numpy_helper.from_array(zp, "zeros")]

    def session(K_attr, activation=0):
        node = helper.make_node("Int4Linear", ["x", "W", "scales", "zeros"], ["y"], domain="edge_vila", K=K_attr, N=N,
                                block_size=bs, activation=activation)
        g = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", N])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("edge_vila", 1)])
        so = ort.SessionOptions()
        so.register_custom_ops_library(str(libs["native"]))
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    x = rng.standard_normal((1, 4, K)).astype(np.float32)
    (y,) = session(K).run(None, {"x": x})
    same, _ = _reference(lin, x)
    assert np.abs(y.reshape(-1, N) - same).max() <= 1e-5 * np.abs(same).max()
    with pytest.raises(Exception, match="Int4Linear: shapes do not fit K=160 N=50 block_size=32 activation=1"):
        session(K, activation=1).run(None, {"x": x})  # SwiGLU wants gate | up: 2K channels
    with pytest.raises(Exception, match="Int4Linear: K and N must be positive"):
        session(K, activation=2)


@pytest.mark.parametrize("kind", ["native", "portable"])
def test_rmsnorm_prologue(libs, kind):
    """norm_weight (+ skip): the linear reads RMSNorm(x + skip) * w and returns x + skip, as the
    SkipSimplifiedLayerNormalization node it replaces in the fast graph."""
    rng = np.random.default_rng(4)
    K, N, bs, eps = 200, 33, 40, 1e-5
    lin = _linear(rng, K, N, bs)
    x, skip = rng.standard_normal((2, 5, K)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, K).astype(np.float32)
    total = x + skip
    normed = total / np.sqrt((total.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * w
    same, _ = _reference(lin, normed)
    y, got_total = int4_linear(libs["native"], x, pack_int4_tiles(lin), K, N, bs, skip=skip, norm_weight=w, epsilon=eps,
                               portable=kind == "portable")
    np.testing.assert_allclose(got_total, total, rtol=1e-6)
    assert np.abs(y.reshape(-1, N) - same).max() <= 1e-4 * np.abs(same).max()
    y2, _ = int4_linear(libs["native"], x, pack_int4_tiles(lin), K, N, bs, norm_weight=w, epsilon=eps)  # no skip
    same2, _ = _reference(lin, x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * w)
    assert np.abs(y2.reshape(-1, N) - same2).max() <= 1e-4 * np.abs(same2).max()
