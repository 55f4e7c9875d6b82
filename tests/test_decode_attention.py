"""Our ONNX Runtime attention op (backends/csrc/decode_attention.c) against a numpy reference
of the same maths, one node at a time, and through the fast graph against GroupQueryAttention."""
from __future__ import annotations

import gc
import os
import platform
import time
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from edge_vila.backends.native_ops import build_library, kernels, use_kernel  # noqa: E402

NH, NKV, HD, MAXC = 6, 2, 32, 150  # 150: the last key block is partly beyond max_seq
PREFILL_THEN_DECODE = [(0, MAXC - 1), (MAXC - 1, 1)]  # (past, new tokens): a short schedule to the cache's end


def _session(lib, maxc: int, parallel: bool):
    ins = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, "S", (NH + 2 * NKV) * HD]),
           helper.make_tensor_value_info("past_key", TensorProto.INT8, [1, NKV, "kb", HD, 64]),
           helper.make_tensor_value_info("past_value", TensorProto.INT8, [1, NKV, "max_seq", HD]),
           helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
           helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
           helper.make_tensor_value_info("cos_cache", TensorProto.FLOAT, [maxc, HD // 2]),
           helper.make_tensor_value_info("sin_cache", TensorProto.FLOAT, [maxc, HD // 2]),
           helper.make_tensor_value_info("k_scale", TensorProto.FLOAT, [1, NKV, 1, HD]),
           helper.make_tensor_value_info("v_scale", TensorProto.FLOAT, [1, NKV, 1, HD])]
    outs = [helper.make_tensor_value_info("attn", TensorProto.FLOAT, [1, "S", NH * HD]),
            helper.make_tensor_value_info("present_key", TensorProto.INT8, [1, NKV, "kb", HD, 64]),
            helper.make_tensor_value_info("present_value", TensorProto.INT8, [1, NKV, "max_seq", HD])]
    node = helper.make_node("DecodeAttention", [i.name for i in ins], [o.name for o in outs], domain="edge_vila",
                            num_heads=NH, kv_num_heads=NKV, scale=HD ** -0.5, parallel=int(parallel))
    model = helper.make_model(helper.make_graph([node], "t", ins, outs),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("edge_vila", 1)],
                              ir_version=10)  # what every onnxruntime >= 1.20 reads
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _kernel_lib(folder, kernel: str, isa: str = "native"):
    """A library of its own (the kernel choice is per loaded library) running `kernel`."""
    if isa != "native" and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("an x86 build; elsewhere the native build is the only one")
    lib = build_library(folder, isa=isa)
    if kernel not in kernels(lib):
        pytest.skip(f"this CPU/build has no {kernel} kernel (has {kernels(lib)})")
    use_kernel(lib, kernel)
    return lib


@pytest.fixture(scope="module", params=["avx512", "avx512-parallel", "avx2", "avx2-parallel", "neon",
                                        "neon-parallel", "portable", "avx2-build"])
def session(request, tmp_path_factory):
    """Every kernel this machine runs (AVX-512; the 8-lane vector path that AVX2 and NEON compile;
    the C loops), each also splitting the KV heads over our thread pool (parallel=1, as in graphs
    with our linear op), and the AVX2 path from a build without AVX-512."""
    kernel, _, parallel = request.param.partition("-parallel")
    isa = "avx2" if kernel == "avx2-build" else "native"
    lib = _kernel_lib(tmp_path_factory.mktemp("ops"), "avx2" if isa == "avx2" else kernel, isa)
    return _session(lib, MAXC, request.param.endswith("-parallel"))


def _rope_tables(maxc: int = MAXC):
    inv = 1.0 / 10000 ** (np.arange(0, HD, 2) / HD)
    ang = np.arange(maxc)[:, None] * inv[None]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _rope(x, cos, sin):  # x [..., HD] at one position; rotate-half
    a, b = x[..., : HD // 2], x[..., HD // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


class Reference:
    """The op's maths in numpy: RoPE, symmetric per-channel INT8 K/V, causal GQA softmax."""

    def __init__(self, ks, vs, maxc: int = MAXC):
        self.ks, self.vs = ks[0, :, 0], vs[0, :, 0]  # [NKV, HD]
        self.k = np.zeros((NKV, maxc, HD), np.float32)  # dequantized cache
        self.v = np.zeros((NKV, maxc, HD), np.float32)

    def step(self, qkv, past, cos, sin):
        S = qkv.shape[0]
        q = qkv[:, : NH * HD].reshape(S, NH, HD)
        k = qkv[:, NH * HD:(NH + NKV) * HD].reshape(S, NKV, HD)
        v = qkv[:, (NH + NKV) * HD:].reshape(S, NKV, HD)
        for t in range(S):
            p = past + t
            kr = _rope(k[t], cos[p], sin[p])
            self.k[:, p] = np.clip(np.round(kr / self.ks), -127, 127) * self.ks
            self.v[:, p] = np.clip(np.round(v[t] / self.vs), -127, 127) * self.vs
        out = np.zeros((S, NH, HD), np.float32)
        for t in range(S):
            p = past + t
            for h in range(NH):
                g = h // (NH // NKV)
                s = self.k[g, : p + 1] @ _rope(q[t, h], cos[p], sin[p]) * HD ** -0.5
                w = np.exp(s - s.max())
                out[t, h] = (w / w.sum()) @ self.v[g, : p + 1]
        return out.reshape(S, NH * HD)


def _check(session, schedule, maxc: int) -> float:
    """Run `schedule` ((past, new tokens) steps) through the op and the reference; the worst
    relative error. The value cache must equal the reference's byte for byte."""
    rng = np.random.default_rng(0)
    cos, sin = _rope_tables(maxc)
    ks = rng.uniform(0.02, 0.05, (1, NKV, 1, HD)).astype(np.float32)
    vs = rng.uniform(0.01, 0.03, (1, NKV, 1, HD)).astype(np.float32)
    ref = Reference(ks, vs, maxc)
    kbuf = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, NKV, -(-maxc // 64), HD, 64), np.int8))
    vbuf = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, NKV, maxc, HD), np.int8))

    def run(qkv, past):
        S = qkv.shape[0]
        io = session.io_binding()
        for name, val in [("qkv", qkv[None]), ("seqlens_k", np.array([past + S - 1], np.int32)),
                          ("total_sequence_length", np.array(past + S, np.int32)), ("cos_cache", cos),
                          ("sin_cache", sin), ("k_scale", ks), ("v_scale", vs)]:
            io.bind_cpu_input(name, val if val.ndim == 0 else np.ascontiguousarray(val))
        io.bind_output("attn")
        io.bind_ortvalue_input("past_key", kbuf)
        io.bind_ortvalue_output("present_key", kbuf)  # one buffer in and out: written in place
        io.bind_ortvalue_input("past_value", vbuf)
        io.bind_ortvalue_output("present_value", vbuf)
        session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()[0]

    worst = 0.0
    for past, n in schedule:
        x = rng.normal(0, 2, (n, (NH + 2 * NKV) * HD)).astype(np.float32)
        got, want = run(x, past), ref.step(x, past, cos, sin)
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    assert past + n == maxc
    vcache = vbuf.numpy()[0]  # the value cache is the reference's, byte for byte
    np.testing.assert_array_equal(vcache[:, :maxc].astype(np.float32) * ref.vs[:, None], ref.v)
    return worst


def test_matches_reference_over_prefill_decode_and_rewind(session):
    # prefill across a key block, decode to the end of the cache, a rewind to 40
    schedule = [(0, 70)] + [(70 + i, 1) for i in range(60)] + [(40, 5), (45, 1)] + [(46 + i, 1) for i in range(104)]
    assert _check(session, schedule, MAXC) < 1e-4


def test_long_context_decode_split_over_positions(tmp_path):
    """From 512 positions on, a parallel op splits each head's positions into chunks and merges
    the partial softmaxes (flash-decoding); decode across that threshold to a cache end that is
    not a whole key block."""
    maxc = 700
    for kernel in ("avx512", "avx2", "neon"):
        lib = build_library(tmp_path / kernel)
        if kernel not in kernels(lib):
            continue
        use_kernel(lib, kernel)
        for parallel in (True, False):
            sess = _session(lib, maxc, parallel)
            schedule = [(0, 500)] + [(500 + i, 1) for i in range(200)]
            assert _check(sess, schedule, maxc) < 1e-4, (kernel, parallel)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps (Linux)")
def test_library_stays_loaded_after_its_last_session_is_freed(tmp_path):
    """ONNX Runtime dlclose()s a custom-op library with the last session that registered it, while
    our pool's worker threads sleep inside it; the next session then mapped it again under them and
    a parallel op crashed or hung (CI hung here). The library is linked never to be unloaded."""
    lib = build_library(tmp_path)
    sess = _session(lib, MAXC, parallel=True)
    assert _check(sess, PREFILL_THEN_DECODE, MAXC) < 1e-4  # a parallel op: the pool's workers start
    del sess
    gc.collect()
    assert str(lib) in Path("/proc/self/maps").read_text()
    assert _check(_session(lib, MAXC, parallel=True), PREFILL_THEN_DECODE, MAXC) < 1e-4


@pytest.mark.skipif(not hasattr(os, "fork") or not Path("/proc/self/task").is_dir(), reason="fork + /proc (Linux)")
def test_a_forked_child_gets_a_fresh_pool(tmp_path):
    """A child after fork() has none of the parent's pool workers; the op must still answer right
    there, and the pool must start its own worker instead of counting on (and signalling) the
    parent's sleeping ones."""
    from edge_vila.backends.native_ops import set_threads

    lib = build_library(tmp_path)
    set_threads(lib, 2)
    sess = _session(lib, MAXC, parallel=True)
    assert _check(sess, PREFILL_THEN_DECODE, MAXC) < 1e-4  # the parent's worker starts, then sleeps
    time.sleep(0.05)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running pytest's teardown
        try:
            before = len(os.listdir("/proc/self/task"))
            ok = _check(sess, PREFILL_THEN_DECODE, MAXC) < 1e-4
            os.write(w, f"{int(ok)} {before} {len(os.listdir('/proc/self/task'))}".encode())
        finally:
            os._exit(0)
    os.close(w)
    deadline = time.monotonic() + 60
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail("the forked child hung in the op")
        time.sleep(0.05)
    ok, before, after = map(int, os.read(r, 100).split())
    os.close(r)
    assert ok and after == before + 1  # right answers, and one fresh worker in the child


def test_bad_shapes_and_lengths_fail_with_the_ops_message(session):
    cos, sin = _rope_tables()
    feeds = {"qkv": np.zeros((1, 1, (NH + 2 * NKV) * HD), np.float32),
             "past_key": np.zeros((1, NKV, 3, HD, 64), np.int8), "past_value": np.zeros((1, NKV, MAXC, HD), np.int8),
             "seqlens_k": np.array([MAXC], np.int32), "total_sequence_length": np.array(MAXC + 1, np.int32),
             "cos_cache": cos, "sin_cache": sin, "k_scale": np.ones((1, NKV, 1, HD), np.float32),
             "v_scale": np.ones((1, NKV, 1, HD), np.float32)}
    with pytest.raises(Exception, match="DecodeAttention: total length 151"):
        session.run(None, feeds)
    feeds.update(seqlens_k=np.array([0], np.int32), total_sequence_length=np.array(1, np.int32),
                 past_key=np.zeros((1, NKV, 2, HD, 64), np.int8))  # 128 key positions for 150 values
    with pytest.raises(Exception, match="DecodeAttention: shapes do not fit num_heads=6 kv_num_heads=2"):
        session.run(None, feeds)


def test_without_a_compiler_the_backend_keeps_ort_ops(monkeypatch, tmp_path, caplog):
    from edge_vila.backends import native_ops

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native_ops, "_compiler", lambda: None)
    with pytest.raises(RuntimeError, match="no C compiler"):
        native_ops.build_library()
    assert native_ops.try_build_library() is None
    assert "keeping ONNX Runtime's GroupQueryAttention and MatMulNBits" in caplog.text
    monkeypatch.setattr(native_ops, "_compiler", lambda: "false")  # a "compiler" that fails
    with pytest.raises(RuntimeError, match="false could not build the ops in"):
        native_ops.build_library()
    assert not list(tmp_path.rglob("*.so*"))  # nothing half-written is left to load
