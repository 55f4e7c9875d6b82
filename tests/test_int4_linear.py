"""Our INT4 linear op (backends/csrc/int4_linear.c): the packed layout and every kernel this
machine can run (AVX-512 VNNI, AVX2, NEON dot product, the portable loops; each x86 one also
from a build without the larger ISAs, as CPUs without them compile it) against a numpy model of
the same maths, through ctypes and as an ONNX Runtime node, plus its errors and its thread pool."""
from __future__ import annotations

import numpy as np
import pytest

from edge_vila.backends.native_ops import int4_linear, kernels, set_threads, use_kernel
from edge_vila.backends.ort_fast import Int4Linear, pack_int4_tiles
from op_builds import X86, lib_for, libs  # noqa: F401 (libs: the module's builds, a fixture)

# (build, kernel): every kernel of the native build, and the x86 builds without AVX-512 / AVX2
CASES = [("native", k) for k in ("avx512", "avx2", "neon", "portable")] + [("avx2", "avx2"), ("avx2", "portable"),
                                                                          ("portable", "portable")]


def _linear(rng, K, N, bs, symmetric=False):
    """Scales float16 holds exactly (the packed form the op reads is then the reference's own)."""
    nb = -(-K // bs)
    zeros = np.full((nb, N), 8, np.uint8) if symmetric else rng.integers(0, 16, (nb, N), dtype=np.uint8)
    return Int4Linear(rng.integers(0, 16, (K, N), dtype=np.uint8),
                      rng.uniform(1e-3, 2e-2, (nb, N)).astype(np.float16).astype(np.float32), zeros, bs)


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
@pytest.mark.parametrize("build,kernel", CASES)
@pytest.mark.parametrize("form", ["f16", "f32", "f16-symmetric"])
def test_matches_reference(libs, build, kernel, K, N, bs, M, form):
    """Odd K (a short last block) and N (a partial last tile), one row (decode's kernel) and
    13 rows (prefill's 8 + 4 + 1 row groups), with a bias; scales in float16 or float32, zero
    points stored or (symmetric) implied."""
    lib = lib_for(libs, build, kernel)
    rng = np.random.default_rng(K + N + M)
    lin = _linear(rng, K, N, bs, symmetric=form == "f16-symmetric")
    x = rng.standard_normal((M, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    packed = pack_int4_tiles(lin, half_scales=form != "f32")
    assert packed[1].dtype == (np.float32 if form == "f32" else np.float16)
    assert (packed[2] is None) == (form == "f16-symmetric")
    y = int4_linear(lib, x, packed, K, N, bs, bias, kernel=kernel)
    same, plain = _reference(lin, x)
    assert y.shape == (M, N)
    assert np.abs(y - bias - same).max() <= 1e-5 * np.abs(same).max()
    assert np.abs(y - bias - plain).max() <= 0.02 * np.abs(plain).max()  # int8 activations: ~0.5% here


def test_half_scales_only_where_float16_holds_them():
    """A scale float16 rounds by more than its precision (past its range, or a subnormal) keeps
    the whole linear's scales float32: the packed form never changes the weights."""
    rng = np.random.default_rng(5)
    for bad in (7e4, 1e-6):
        lin = _linear(rng, 64, 16, 32)
        lin.scale[1, 3] = bad
        W, sc, _ = pack_int4_tiles(lin)
        assert sc.dtype == np.float32 and sc[3 // 16, 1, 3] == np.float32(bad)
    raw = _linear(rng, 64, 16, 32)
    raw.scale[:] = rng.uniform(1e-3, 2e-2, raw.scale.shape).astype(np.float32)  # not float16 values: rounded
    _, sc, _ = pack_int4_tiles(raw)
    assert sc.dtype == np.float16
    assert np.abs(sc[0].astype(np.float32) - raw.scale).max() <= 2e-2 * 2.0 ** -11


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


def test_kernels_follow_the_cpu_and_the_build(libs):
    flags = set(next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "").split())
    have = kernels(libs["native"])
    assert have[0] == "portable"
    if X86:
        assert ("avx512" in have) == ({"avx512f", "avx512bw", "avx512_vnni"} <= flags)
        assert ("avx2" in have) == ({"avx2", "fma"} <= flags)
        assert "avx512" not in kernels(libs["avx2"]) and kernels(libs["portable"]) == ["portable"]
    else:  # the kernel's own test: AT_HWCAP from the auxiliary vector (qemu-user emulates it, not cpuinfo)
        auxv = np.frombuffer(open("/proc/self/auxv", "rb").read(), np.uint64).reshape(-1, 2)
        hwcap = int(next(v for k, v in auxv if k == 16))
        assert ("neon" in have) == bool(hwcap & (1 << 20))
    with pytest.raises(ValueError, match="kernel 'sve': not available here"):
        use_kernel(libs["native"], "sve")
    with pytest.raises(ValueError, match="kernel 'avx512': not available here"):
        if X86:
            use_kernel(libs["portable"], "avx512")
        else:
            use_kernel(libs["native"], "avx512")
    x = np.ones((1, 64), np.float32)
    lin = _linear(np.random.default_rng(0), 64, 16, 32)
    with pytest.raises(ValueError, match="int4_linear: kernel 'neon' not available here" if X86 else "kernel 'avx2'"):
        int4_linear(libs["native"], x, pack_int4_tiles(lin), 64, 16, 32, kernel="neon" if X86 else "avx2")


def test_as_an_onnx_runtime_node(libs):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    K, N, bs = 160, 50, 32
    lin = _linear(rng, K, N, bs)
    W, sc, zp = pack_int4_tiles(lin)
    assert sc.dtype == np.float16
    sym = _linear(rng, K, N, bs, symmetric=True)
    Ws, scs, zps = pack_int4_tiles(sym, half_scales=False)
    assert zps is None and scs.dtype == np.float32
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(sc, "scales"), numpy_helper.from_array(zp, "zeros"),
             numpy_helper.from_array(Ws, "Ws"), numpy_helper.from_array(scs, "scs"),
             numpy_helper.from_array(np.ones(sc.shape, np.int32), "bad_scales")]

    def session(K_attr, activation=0, weights=("W", "scales", "zeros")):
        node = helper.make_node("Int4Linear", ["x", *weights], ["y"], domain="edge_vila", K=K_attr, N=N,
                                block_size=bs, activation=activation)
        g = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", N])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("edge_vila", 1)],
                              ir_version=10)  # what every onnxruntime >= 1.20 reads
        so = ort.SessionOptions()
        so.register_custom_ops_library(str(libs["native"]))
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    x = rng.standard_normal((1, 4, K)).astype(np.float32)
    (y,) = session(K).run(None, {"x": x})
    same, _ = _reference(lin, x)
    assert np.abs(y.reshape(-1, N) - same).max() <= 1e-5 * np.abs(same).max()
    (y,) = session(K, weights=("Ws", "scs", "")).run(None, {"x": x})  # float32 scales, zeros implied (8)
    same, _ = _reference(sym, x)
    assert np.abs(y.reshape(-1, N) - same).max() <= 1e-5 * np.abs(same).max()
    with pytest.raises(Exception, match="Int4Linear: input scales must be float or float16"):
        session(K, weights=("W", "bad_scales", "zeros")).run(None, {"x": x})
    with pytest.raises(Exception, match="Int4Linear: shapes do not fit K=160 N=50 block_size=32 activation=1"):
        session(K, activation=1).run(None, {"x": x})  # SwiGLU wants gate | up: 2K channels
    with pytest.raises(Exception, match="Int4Linear: K and N must be positive"):
        session(K, activation=2)


@pytest.mark.parametrize("kernel", ["avx512", "avx2", "neon", "portable"])
def test_rmsnorm_prologue(libs, kernel):
    """norm_weight (+ skip): the linear reads RMSNorm(x + skip) * w and returns x + skip, as the
    SkipSimplifiedLayerNormalization node it replaces in the fast graph. K is no multiple of 8 or
    16, so every vector path also runs its scalar tail."""
    rng = np.random.default_rng(4)
    K, N, bs, eps = 203, 33, 40, 1e-5
    lin = _linear(rng, K, N, bs)
    x, skip = rng.standard_normal((2, 5, K)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, K).astype(np.float32)
    total = x + skip
    normed = total / np.sqrt((total.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * w
    same, _ = _reference(lin, normed)
    y, got_total = int4_linear(lib_for(libs, "native", kernel), x, pack_int4_tiles(lin), K, N, bs, skip=skip,
                               norm_weight=w, epsilon=eps, kernel=kernel)
    np.testing.assert_allclose(got_total, total, rtol=1e-6)
    assert np.abs(y.reshape(-1, N) - same).max() <= 1e-4 * np.abs(same).max()
    y2, _ = int4_linear(lib_for(libs, "native", kernel), x, pack_int4_tiles(lin), K, N, bs, norm_weight=w, epsilon=eps,
                        kernel=kernel)  # no skip
    same2, _ = _reference(lin, x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * w)
    assert np.abs(y2.reshape(-1, N) - same2).max() <= 1e-4 * np.abs(same2).max()
