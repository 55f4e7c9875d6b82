"""Our INT8 linear op (backends/csrc/int8_linear.c, the INT8 ViT's linears on x86 without VNNI):
the packed layout and every kernel this machine runs (the AVX2 loops from the native and the
AVX2-only builds, the portable loops) against a numpy model of the same maths, through ctypes and
as an ONNX Runtime node; the graph rewrite (vision_cpu.to_edge_int8) against the graph it
replaces; and the errors."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_vila.backends.native_ops import int8_linear, kernels, set_threads
from edge_vila.backends.vision_cpu import pack_int8_panels, to_edge_int8
from op_builds import X86, lib_for, libs  # noqa: F401 (libs: the module's builds, a fixture)

CASES = [("native", "avx2"), ("native", "portable"), ("avx2", "avx2"), ("portable", "portable")]


def _reference(x, q, scale, bias=None, gelu=False):
    """The op's maths: each row to 7 bits over its own [min, max] (holding 0) with a zero point,
    exact integer products, one float scale per row and per output channel."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float32)
    lo, hi = np.minimum(x.min(1, keepdims=True), 0), np.maximum(x.max(1, keepdims=True), 0)
    inv = np.where(hi > lo, np.float32(127) / np.maximum(hi - lo, 1e-30), 0).astype(np.float32)
    z = np.rint(-lo * inv)
    xq = np.clip(np.rint(x * inv) + z, 0, 127) - z
    y = (xq @ q.astype(np.float64)) * ((hi - lo) / np.float32(127)) * scale
    if bias is not None:
        y = y + bias
    if gelu:
        y = 0.5 * y * (1 + np.tanh(0.7978845608 * (y + 0.044715 * y ** 3)))
    return y


def _weights(rng, K, N):
    return rng.integers(-128, 128, (K, N)).astype(np.int8), rng.uniform(1e-3, 1e-2, N).astype(np.float32)


@pytest.mark.parametrize("build,kernel", CASES)
@pytest.mark.parametrize("M,K,N,gelu", [(1, 8, 16, False), (7, 36, 37, True), (13, 768, 48, False),
                                        (196, 128, 3072 // 16, True), (5, 3072, 20, False)])
def test_int8_linear_matches_the_reference(libs, build, kernel, M, K, N, gelu):
    """Tails of every kind: rows not a multiple of 4, K not a multiple of 4, N not one of 16."""
    lib = lib_for(libs, build, kernel)
    rng = np.random.default_rng(M * 7 + K + N)
    q, scale = _weights(rng, K, N)
    x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 4, (M, 1))).astype(np.float32)
    x[0, : K // 3] = np.abs(x[0, : K // 3])  # skewed rows: the zero point is not the middle
    bias = rng.standard_normal(N).astype(np.float32)
    y = int8_linear(lib, x, pack_int8_panels(q, scale), K, N, bias=bias, gelu=gelu, kernel=kernel)
    ref = _reference(x, q, scale, bias, gelu)
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    # and the float product it stands for: 7 bits per row
    plain = x.astype(np.float64) @ (q * scale.astype(np.float64)) + bias
    if gelu:
        plain = 0.5 * plain * (1 + np.tanh(0.7978845608 * (plain + 0.044715 * plain ** 3)))
    cos = (y * plain).sum(-1) / np.linalg.norm(y, axis=-1) / np.linalg.norm(plain, axis=-1)
    assert cos.min() > 0.998, cos


def test_int8_linear_rows_of_zeros_and_one_sign(libs):
    lib = libs["native"]
    rng = np.random.default_rng(3)
    q, scale = _weights(rng, 64, 32)
    x = np.zeros((3, 64), np.float32)
    x[1] = np.abs(rng.standard_normal(64))   # all >= 0: zero point 0
    x[2] = -np.abs(rng.standard_normal(64))  # all <= 0: zero point 127
    y = int8_linear(lib, x, pack_int8_panels(q, scale), 64, 32)
    assert np.all(y[0] == 0)
    np.testing.assert_allclose(y, _reference(x, q, scale), rtol=0, atol=2e-5 * np.abs(y).max())


@pytest.mark.parametrize("build,kernel", CASES)
def test_int8_linear_extremes_do_not_saturate(libs, build, kernel):
    """Every activation at 127 against weights at -128 and 127: VPMADDUBSW's pair sums reach
    +-2 x 127 x 128 and must come out exact (an 8-bit activation would saturate its int16)."""
    lib = lib_for(libs, build, kernel)
    q = np.full((256, 32), -128, np.int8)
    q[:, 16:] = 127
    scale = np.full(32, 1e-3, np.float32)
    x = np.full((5, 256), 3.0, np.float32)  # range [0, 3]: every element quantizes to 127
    y = int8_linear(lib, x, pack_int8_panels(q, scale), 256, 32, kernel=kernel)
    np.testing.assert_allclose(y[:, :16], 3.0 * 256 * -128 * 1e-3, rtol=1e-6)
    np.testing.assert_allclose(y[:, 16:], 3.0 * 256 * 127 * 1e-3, rtol=1e-6)


def test_int8_linear_threads_agree(libs):
    lib = libs["native"]
    rng = np.random.default_rng(4)
    q, scale = _weights(rng, 256, 160)
    x = rng.standard_normal((37, 256)).astype(np.float32)
    packed = pack_int8_panels(q, scale)
    try:
        set_threads(lib, 1)
        one = int8_linear(lib, x, packed, 256, 160)
        set_threads(lib, 2)
        np.testing.assert_array_equal(int8_linear(lib, x, packed, 256, 160), one)
    finally:
        set_threads(lib, 0)


def test_pack_int8_panels_layout_and_errors():
    q = np.arange(-60, 60, dtype=np.int8).reshape(8, 15)
    w, s, sums = pack_int8_panels(q, np.ones(15, np.float32))
    assert w.shape == (1, 8 * 16) and s.shape == sums.shape == (16,) and sums.dtype == np.int32
    # panel 0, input channels 0-3, output channel 9 (second half, lane 1): 4 bytes at 32 + 4
    np.testing.assert_array_equal(w[0, 36:40], q[0:4, 9])
    np.testing.assert_array_equal(sums[:15], q.astype(np.int32).sum(0))
    assert sums[15] == 0 and s[15] == 0
    with pytest.raises(ValueError, match="int8"):
        pack_int8_panels(q.astype(np.int16), np.ones(15, np.float32))


def test_int8_linear_errors(libs):
    lib = libs["native"]
    q, scale = _weights(np.random.default_rng(0), 16, 16)
    packed = pack_int8_panels(q, scale)
    with pytest.raises(ValueError, match="x has 12 channels"):
        int8_linear(lib, np.zeros((1, 12)), packed, 16, 16)
    with pytest.raises(ValueError, match="do not fit K=20"):
        int8_linear(lib, np.zeros((1, 20)), packed, 20, 16)
    if "avx512" not in kernels(lib) and X86:
        with pytest.raises(ValueError, match="not available"):
            int8_linear(lib, np.zeros((1, 16)), packed, 16, 16, kernel="avx512")


def _qdq_mlp(rng, K=64, H=96, tokens=10):
    """x -> Q/DQ -> MatMul(DQ int8 W1) + b1 -> Gelu(tanh) -> Q/DQ -> MatMul(DQ W2) + b2: the INT8
    ViT's MLP as the bundle writes it (S8 symmetric, per-channel weights on axis 1)."""
    nodes, inits = [], []

    def qdq(name, src, amax):
        inits.extend([numpy_helper.from_array(np.array(amax / 127, np.float32), f"{name}_s"),
                      numpy_helper.from_array(np.array(0, np.int8), f"{name}_z")])
        nodes.append(helper.make_node("QuantizeLinear", [src, f"{name}_s", f"{name}_z"], [f"{name}_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"]))
        return f"{name}_dq"

    def linear(name, src, k, n):
        q, s = _weights(rng, k, n)
        inits.extend([numpy_helper.from_array(q, f"{name}_w"), numpy_helper.from_array(s, f"{name}_ws"),
                      numpy_helper.from_array(np.zeros(n, np.int8), f"{name}_wz"),
                      numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"{name}_b")])
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_w", f"{name}_ws", f"{name}_wz"], [f"{name}_wdq"],
                                      axis=1))
        nodes.append(helper.make_node("MatMul", [src, f"{name}_wdq"], [f"{name}_mm"]))
        nodes.append(helper.make_node("Add", [f"{name}_mm", f"{name}_b"], [f"{name}_out"]))
        return f"{name}_out"

    h = linear("fc1", qdq("a1", "x", 4.0), K, H)
    nodes.append(helper.make_node("Gelu", [h], ["g"], approximate="tanh"))
    y = linear("fc2", qdq("a2", "g", 8.0), H, K)
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, K])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, tokens, K])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)],
                             ir_version=10)  # what every onnxruntime >= 1.20 reads (aarch64's is older)


def test_to_edge_int8_rewrites_the_qdq_graph_and_runs_in_ort(libs):
    rng = np.random.default_rng(5)
    model = _qdq_mlp(rng)
    x = rng.standard_normal((1, 10, 64)).astype(np.float32)
    t = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    gelu = lambda v: 0.5 * v * (1 + np.tanh(0.7978845608 * (v + 0.044715 * v ** 3)))  # noqa: E731
    ref = gelu(x @ (t["fc1_w"] * t["fc1_ws"]) + t["fc1_b"]) @ (t["fc2_w"] * t["fc2_ws"]) + t["fc2_b"]  # float activations
    out_name = model.graph.output[0].name
    edge = onnx.ModelProto()
    edge.CopyFrom(model)
    assert to_edge_int8(edge) == 2
    ops = [n.op_type for n in edge.graph.node]
    assert ops == ["Int8Linear", "Int8Linear"], ops  # Q/DQ, bias Adds and the GELU folded in
    assert [a.i for a in edge.graph.node[0].attribute if a.name == "activation"] == [1]
    assert edge.graph.output[0].name == out_name
    eso = ort.SessionOptions()
    eso.register_custom_ops_library(str(libs["native"]))
    got = ort.InferenceSession(edge.SerializeToString(), eso, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == ref.shape
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.999, cos
    # a GELU of the erf form is left to ORT, and so is a weight that is not symmetric
    other = _qdq_mlp(np.random.default_rng(5))
    next(n for n in other.graph.node if n.op_type == "Gelu").attribute[0].s = b"none"
    assert to_edge_int8(other) == 2
    assert [n.op_type for n in other.graph.node] == ["Int8Linear", "Gelu", "Int8Linear"]
    asym = _qdq_mlp(np.random.default_rng(5))
    next(t for t in asym.graph.initializer if t.name == "fc1_wz").CopyFrom(
        numpy_helper.from_array(np.ones(96, np.int8), "fc1_wz"))
    assert to_edge_int8(asym) == 1


def test_int8_linear_node_errors(libs):
    """Shapes that do not fit the attributes are the op's error, naming it, not a crash."""
    rng = np.random.default_rng(6)
    q, scale = _weights(rng, 32, 16)
    w, s, sums = pack_int8_panels(q, scale)
    node = helper.make_node("Int8Linear", ["x", "w", "s", "c"], ["y"], domain="edge_vila", K=32, N=16)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(s, "s"),
                               numpy_helper.from_array(sums, "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("edge_vila", 1)],
                              ir_version=10)
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(libs["native"]))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, 32)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], _reference(x, q, scale), rtol=0, atol=1e-4)
    with pytest.raises(Exception, match="Int8Linear: shapes do not fit K=32 N=16"):
        sess.run(None, {"x": np.zeros((2, 30), np.float32)})
