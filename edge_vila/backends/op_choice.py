"""Whether our ops (native_ops.py) or ONNX Runtime's run by default on this machine: measured,
not assumed from the CPU's name. Our INT4 linear beat MatMulNBits by streaming weights faster
with AVX-512 VNNI, but on a Zen 3 without AVX-512 it was no faster, and ORT's kernels differ per
CPU family; so the fast graph's defaults (`matmul="auto"`, `attention="auto"`) follow a one-off
timing of both, at the model's decode shapes, on this machine.

The timing runs once per op library (which is built per CPU and compiler), model shape and
thread count - a second or two at a 3B model's shapes, at the first load or at
`edge-vila build --target ort-cpu` - and is recorded beside the library
(`<library>.choice.json`, with the library's sha256: a record for another build is never
used). Decode is what the choice is for: one token through Llama MLP blocks as the fast graph
writes them with each op (ours folds the RMSNorm and SwiGLU into the linears: 2 nodes against
ORT's 7), and attention over 1024 cached positions of the INT8 cache. Each runs as a chain of
blocks with weights (caches) of their own, as many as the model's layers would stream (up to
`MAX_NODES`), so the weights come from where decode finds them: one node's 9 MB sat in this
machine's 300 MB L3 and timed MatMulNBits at 28 GB/s, twice what a 3B model's decode can stream
from DRAM. Each op is timed in a fresh process, the best of three rounds (see OPS).
"""
from __future__ import annotations

import functools
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..fsutil import atomic_write_json

log = logging.getLogger(__name__)
ATTENTION_POSITIONS = 1024  # cached positions the attention timing runs at (capped by the context)
MAX_NODES = 32
ROUNDS = 3
# each op is timed in a process of its own: in one process, once an ORT session had run
# MatMulNBits, our linear ran 1.5-1.9x slower for the rest of the process (freeing the session did
# not help; this CPU has AMX, which ORT's int8 kernels may use) - so whichever op ran second lost
OPS = {"edge_mlp": ("linear", True, None), "nbits_mlp": ("linear", False, None),
       "edge_attention_pool": ("attention", True, True), "gqa_one_thread": ("attention", False, True),
       "edge_attention_one_thread": ("attention", True, False), "gqa": ("attention", False, False)}
METHOD = 4  # the timing method's version: a record made by another is measured again


@dataclass(frozen=True)
class Shape:
    """The decode shapes a choice is measured at."""
    hidden: int
    intermediate: int
    num_heads: int
    kv_heads: int
    head_dim: int
    block: int
    positions: int
    threads: int
    num_layers: int = 1

    def linear_share(self) -> float:
        """A layer's INT4 weights over its MLP's (what one timed MLP block stands for)."""
        H, I = self.hidden, self.intermediate
        per_layer = H * (self.num_heads + 2 * self.kv_heads) * self.head_dim + self.num_heads * self.head_dim * H + 3 * H * I
        return per_layer / (3 * H * I)

    def linear_nodes(self) -> int:
        """As many gate/up-sized linears as hold the model's INT4 weights (capped)."""
        return int(min(MAX_NODES, max(1, round(self.num_layers * self.linear_share() * 1.5))))

    def key(self) -> str:
        return "-".join(f"{k}{v}" for k, v in asdict(self).items())


@dataclass(frozen=True)
class OpChoice:
    matmul: str      # edge | nbits
    attention: str   # edge | gqa
    us: dict         # µs: per MLP block (edge_mlp, nbits_mlp), per attention (OPS' others), per layer (layer_*)
    kernel: str      # our ops' kernel when it was measured


def _record_path(lib: Path) -> Path:
    return lib.with_name(lib.name + ".choice.json")


def _median_us(fn, runs: int = 25, min_s: float = 0.3) -> float:
    for _ in range(3):
        fn()
    times, t_end = [], time.perf_counter() + min_s
    while len(times) < runs or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 20 * runs:
            break
    return statistics.median(times) * 1e6


def _linear_timer(lib: Path, s: Shape, ours: bool):
    """One token through a chain of Llama MLP blocks with weights of their own, each as the
    fast graph writes it: ours is the gate/up linear reading RMSNorm(x + residual) and the down
    linear reading SwiGLU(gate | up) (two nodes); ORT's is SkipSimplifiedLayerNormalization,
    MatMulNBits, Split, Sigmoid, Mul, Mul, MatMulNBits (seven) - timing a lone linear left out
    what the folding saves, which at SmolLM2's size is a seventh of a decode step. µs per MLP."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from . import native_ops
    from .ort_fast import Int4Linear, pack_int4_tiles, pack_matmulnbits

    rng = np.random.default_rng(0)
    H, I, bs = s.hidden, s.intermediate, s.block

    def lin(K, N):
        nb = -(-K // bs)
        return Int4Linear(rng.integers(0, 16, (K, N), dtype=np.uint8),
                          rng.uniform(1e-3, 2e-2, (nb, N)).astype(np.float32), rng.integers(0, 16, (nb, N), dtype=np.uint8),
                          bs)

    pack = pack_int4_tiles if ours else pack_matmulnbits
    (Wg, sg, zg), (Wd, sd, zd) = pack(lin(H, 2 * I)), pack(lin(I, H))
    inits = [numpy_helper.from_array(a, n) for a, n in ((sg, "sg"), (zg, "zg"), (sd, "sd"), (zd, "zd"),
                                                        (np.ones(H, np.float32), "nw"),
                                                        (np.array([I, I], np.int64), "split"))]
    nodes, x, res = [], "x", "res"
    n = max(1, int(round(s.linear_nodes() / 1.5)))  # MLP blocks holding about the model's weights
    for i in range(n):  # weights of their own per block (xor: other random nibbles, no second rng pass)
        inits += [numpy_helper.from_array(Wg ^ np.uint8(i * 37 % 256), f"Wg{i}"),
                  numpy_helper.from_array(Wd ^ np.uint8(i * 37 % 256), f"Wd{i}")]
        if ours:
            nodes += [helper.make_node("Int4Linear", [x, f"Wg{i}", "sg", "zg", "", res, "nw"], [f"gu{i}", f"r{i}"],
                                       domain="edge_vila", K=H, N=2 * I, block_size=bs, epsilon=1e-5),
                      helper.make_node("Int4Linear", [f"gu{i}", f"Wd{i}", "sd", "zd"], [f"d{i}"], domain="edge_vila",
                                       K=I, N=H, block_size=bs, activation=1)]
        else:
            nbits = dict(domain="com.microsoft", bits=4, block_size=bs, accuracy_level=4)
            nodes += [helper.make_node("SkipSimplifiedLayerNormalization", [x, res, "nw"], [f"n{i}", "", "", f"r{i}"],
                                       domain="com.microsoft", epsilon=1e-5),
                      helper.make_node("MatMulNBits", [f"n{i}", f"Wg{i}", "sg", "zg"], [f"gu{i}"], K=H, N=2 * I, **nbits),
                      helper.make_node("Split", [f"gu{i}", "split"], [f"g{i}", f"u{i}"], axis=-1),
                      helper.make_node("Sigmoid", [f"g{i}"], [f"sg{i}"]),
                      helper.make_node("Mul", [f"g{i}", f"sg{i}"], [f"si{i}"]),
                      helper.make_node("Mul", [f"si{i}", f"u{i}"], [f"a{i}"]),
                      helper.make_node("MatMulNBits", [f"a{i}", f"Wd{i}", "sd", "zd"], [f"d{i}"], K=I, N=H, **nbits)]
        x, res = f"d{i}", f"r{i}"
    so = ort.SessionOptions()
    if ours:
        so.register_custom_ops_library(str(lib))
        native_ops.set_threads(lib, s.threads)
        so.intra_op_num_threads = 1  # as in the fast graph: our pool does the parallel work
    else:
        so.intra_op_num_threads = s.threads
    vi = helper.make_tensor_value_info
    g = helper.make_graph(nodes, "mlp", [vi("x", TensorProto.FLOAT, [1, 1, H]), vi("res", TensorProto.FLOAT, [1, 1, H])],
                          [vi(x, TensorProto.FLOAT, [1, 1, H]), vi(res, TensorProto.FLOAT, [1, 1, H])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1),
                                            helper.make_opsetid("edge_vila", 1)], ir_version=10)
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {k: (0.1 * rng.standard_normal((1, 1, H))).astype(np.float32) for k in ("x", "res")}
    return lambda: _median_us(lambda: sess.run(None, feeds), runs=9, min_s=0.2) / n


def _attention_timer(lib: Path, s: Shape, ours: bool, our_linear: bool):
    """One decode step over `positions` cached positions in each of up to MAX_NODES layers'
    caches, bound in place as the backend binds them; threads as the fast graph would run them
    beside the chosen linear."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    nh, nkv, hd, T = s.num_heads, s.kv_heads, s.head_dim, s.positions
    maxc, n = T + 1, max(1, min(s.num_layers, MAX_NODES))
    kdims = [1, nkv, -(-maxc // 64), hd, 64] if ours else [1, nkv, maxc, hd]
    vdims = [1, nkv, maxc, hd]
    vi = helper.make_tensor_value_info
    ins = [vi("qkv", TensorProto.FLOAT, [1, 1, (nh + 2 * nkv) * hd]), vi("seqlens_k", TensorProto.INT32, [1]),
           vi("total_sequence_length", TensorProto.INT32, []), vi("cos_cache", TensorProto.FLOAT, [maxc, hd // 2]),
           vi("sin_cache", TensorProto.FLOAT, [maxc, hd // 2]), vi("k_scale", TensorProto.FLOAT, [1, nkv, 1, hd]),
           vi("v_scale", TensorProto.FLOAT, [1, nkv, 1, hd])]
    outs, nodes = [], []
    for i in range(n):
        ins += [vi(f"past_key{i}", TensorProto.INT8, kdims), vi(f"past_value{i}", TensorProto.INT8, vdims)]
        outs += [vi(f"attn{i}", TensorProto.FLOAT, [1, 1, nh * hd]), vi(f"present_key{i}", TensorProto.INT8, kdims),
                 vi(f"present_value{i}", TensorProto.INT8, vdims)]
        o = [f"attn{i}", f"present_key{i}", f"present_value{i}"]
        if ours:
            nodes.append(helper.make_node(
                "DecodeAttention", ["qkv", f"past_key{i}", f"past_value{i}", "seqlens_k", "total_sequence_length",
                                    "cos_cache", "sin_cache", "k_scale", "v_scale"], o, domain="edge_vila",
                num_heads=nh, kv_num_heads=nkv, scale=hd ** -0.5, parallel=int(our_linear)))
        else:
            nodes.append(helper.make_node(
                "GroupQueryAttention", ["qkv", "", "", f"past_key{i}", f"past_value{i}", "seqlens_k",
                                        "total_sequence_length", "cos_cache", "sin_cache", "", "", "", "k_scale",
                                        "v_scale"], o, domain="com.microsoft", num_heads=nh, kv_num_heads=nkv,
                do_rotary=1, rotary_interleaved=0, scale=hd ** -0.5, kv_cache_bit_width=8,
                k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1 if our_linear else s.threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if ours:
        so.register_custom_ops_library(str(lib))
    m = helper.make_model(helper.make_graph(nodes, "attention", ins, outs),
                          opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1),
                                         helper.make_opsetid("edge_vila", 1)], ir_version=10)
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    ang = np.arange(maxc)[:, None] / 10000 ** (np.arange(0, hd, 2) / hd)[None]
    io = sess.io_binding()
    for name, a in (("qkv", rng.standard_normal((1, 1, (nh + 2 * nkv) * hd)).astype(np.float32)),
                    ("seqlens_k", np.array([T], np.int32)), ("total_sequence_length", np.array(T + 1, np.int32)),
                    ("cos_cache", np.cos(ang).astype(np.float32)), ("sin_cache", np.sin(ang).astype(np.float32)),
                    ("k_scale", np.full((1, nkv, 1, hd), 0.05, np.float32)),
                    ("v_scale", np.full((1, nkv, 1, hd), 0.05, np.float32))):
        io.bind_cpu_input(name, a)
    bufs = []  # the caches live as long as the binding
    for i in range(n):
        for kind, dims in (("key", kdims), ("value", vdims)):
            buf = ort.OrtValue.ortvalue_from_numpy(rng.integers(-100, 100, dims, dtype=np.int8))
            bufs.append(buf)
            io.bind_ortvalue_input(f"past_{kind}{i}", buf)
            io.bind_ortvalue_output(f"present_{kind}{i}", buf)
        io.bind_output(f"attn{i}")
    return lambda: (bufs, _median_us(lambda: sess.run_with_iobinding(io), runs=9, min_s=0.2) / n)[1]


@functools.lru_cache(maxsize=None)
def gqa_int8_unsupported() -> str | None:
    """None where this ONNX Runtime's GroupQueryAttention runs over an INT8 cache (its k_scale /
    v_scale inputs with kv_cache_bit_width=8), else why not. onnxruntime 1.23 refuses those
    inputs (the node's schema stops at 12), and a Jetson's onnxruntime may be older than that:
    there the INT8 cache is ours to attend over. Probed once per process with a one-node graph."""
    import onnxruntime as ort

    try:
        _attention_timer(Path(), Shape(64, 128, 2, 1, 16, 32, 3, 1), ours=False, our_linear=False)
    except Exception as e:  # ORT's errors (InvalidGraph, Fail, ...) share no narrower base
        return f"onnxruntime {ort.__version__}: {str(e).splitlines()[0][:300]}"
    return None


def _time_op(lib: Path, shape: Shape, op: str) -> float:
    """µs per call of `op` (OPS), the best of ROUNDS timing rounds, in this process."""
    kind, ours, our_linear = OPS[op]
    timer = _linear_timer(lib, shape, ours) if kind == "linear" else _attention_timer(lib, shape, ours, our_linear)
    return min(timer() for _ in range(ROUNDS))


def _time_in_child(lib: Path, shape: Shape, op: str) -> float:
    """`_time_op` in a fresh interpreter; in this one where none can be started (e.g. under
    qemu-user without binfmt_misc, which cannot exec the emulated interpreter)."""
    import subprocess
    import sys

    from . import native_ops

    cmd = [sys.executable, "-m", "edge_vila.backends.op_choice", str(lib), json.dumps(asdict(shape)), op,
           native_ops.kernel_in_force(lib)]  # a kernel forced here is forced there too
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except OSError as e:
        log.info("timing %s in this process (cannot start a child: %s)", op, e)
        return _time_op(lib, shape, op)
    if res.returncode != 0:
        raise RuntimeError(f"timing {op} failed: {res.stderr.strip()[-1000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def measure(lib: Path, shape: Shape) -> OpChoice:
    """Times the ops and picks the pair with the shortest decode layer (a layer's linears as
    `linear_share()` MLP blocks, plus its attention). The pairs differ in threading: beside our
    linear ORT runs one thread and our attention splits over our pool; beside MatMulNBits ORT's
    pool runs and our attention runs on the calling thread."""
    from . import native_ops

    no_gqa = gqa_int8_unsupported()
    if no_gqa:
        log.info("GroupQueryAttention cannot attend over the INT8 cache here (%s): timing our attention only", no_gqa)
    us = {}
    for op in OPS:
        if not (no_gqa and op.startswith("gqa")):
            us[op] = _time_in_child(lib, shape, op)
    r = shape.linear_share()
    layer = {("edge", "edge"): us["edge_mlp"] * r + us["edge_attention_pool"],
             ("nbits", "edge"): us["nbits_mlp"] * r + us["edge_attention_one_thread"]}
    if not no_gqa:
        layer.update({("edge", "gqa"): us["edge_mlp"] * r + us["gqa_one_thread"],
                      ("nbits", "gqa"): us["nbits_mlp"] * r + us["gqa"]})
    matmul, attention = min(layer, key=layer.get)
    us.update({f"layer_{m}_{a}": v for (m, a), v in layer.items()})
    return OpChoice(matmul, attention, {k: round(v, 1) for k, v in us.items()}, native_ops.kernel_in_force(lib))


def choose(lib: Path, shape: Shape) -> OpChoice:
    """The recorded choice for `lib` and `shape`, measured and recorded when there is none (or
    the record is for another build of the library)."""
    path = _record_path(lib)
    from . import native_ops

    import onnxruntime

    digest = native_ops.library_sha256(lib)  # verified by build_library: not hashed again
    ort_version = onnxruntime.__version__
    rec: dict = {}
    try:
        rec = json.loads(path.read_text())
        if rec.get("library_sha256") != digest:
            log.warning("%s: recorded for another build of the library: measuring again", path)
            rec = {}
        elif rec.get("onnxruntime") != ort_version:  # ORT's kernels (and what its GQA accepts) change with it
            log.info("%s: recorded with onnxruntime %s, this is %s: measuring again", path, rec.get("onnxruntime"),
                     ort_version)
            rec = {}
        elif rec.get("method") != METHOD:
            log.info("%s: recorded by an older timing method: measuring again", path)
            rec = {}
        got = rec.get("choices", {}).get(shape.key())
        if got:
            return OpChoice(**got)
    except FileNotFoundError:
        pass
    except (ValueError, TypeError, AttributeError) as e:
        log.warning("%s: unreadable (%s): measuring again", path, e)
        rec = {}
    log.info("timing our ops against ONNX Runtime's on this CPU at this model's shapes (once; recorded in %s)", path)
    choice = measure(lib, shape)
    log.info("fast CPU graph defaults here: matmul=%s attention=%s (us per call: %s)", choice.matmul,
             choice.attention, choice.us)
    rec = {"library_sha256": digest, "onnxruntime": ort_version, "method": METHOD, "choices": {**rec.get("choices", {}), shape.key(): asdict(choice)}}
    atomic_write_json(path, rec)
    return choice


def shape_of(cfg, threads: int) -> Shape:
    """The decode shapes of the bundle `cfg` with `threads` threads."""
    import os

    m = cfg.llm
    threads = threads or int(os.environ.get("EDGE_VILA_THREADS") or 0) or len(os.sched_getaffinity(0))
    block = int(cfg.manifest.quant.get("group_size") or 128)
    return Shape(m.hidden_size, m.intermediate_size or 4 * m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim,
                 block, min(ATTENTION_POSITIONS, cfg.max_context - 1), threads, m.num_layers)


if __name__ == "__main__":  # the child of _time_in_child: LIB SHAPE_JSON OP KERNEL -> µs on stdout
    import sys

    from edge_vila.backends import native_ops as _ops

    _ops.use_kernel(Path(sys.argv[1]), sys.argv[4])
    print(_time_op(Path(sys.argv[1]), Shape(**json.loads(sys.argv[2])), sys.argv[3]))

__all__ = ["OpChoice", "Shape", "choose", "measure", "shape_of", "ATTENTION_POSITIONS"]
