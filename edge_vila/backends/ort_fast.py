"""A faster, private CPU variant of the bundle's llm.onnx, built from it for ONNX Runtime.

The bundle's llm.onnx is standard ONNX for TensorRT (block DequantizeLinear -> MatMul,
attention from primitive ops, a KV cache that grows by concatenation). On the CPU, ONNX
Runtime's contrib ops do the same maths faster, so the ORT backend derives this graph from
the bundle and caches it (`engines/ort-cpu/`, cpu_cache.py: keyed and verified by hash):

- every decoder linear -> MatMulNBits with its native AWQ zero points (recovered exactly
  from the bundle's symmetric INT4 + zero-point correction); q/k/v and gate/up are fused
  into one MatMulNBits each - or, `matmul="edge"`, into our Int4Linear op (csrc/int4_linear.c,
  AVX-512 VNNI, our thread pool), which streams the weights faster than MatMulNBits here;
- attention -> GroupQueryAttention with RoPE inside (cos/sin from the bundle's tables) and
  past/present sharing one preallocated buffer: a decode step writes one position in place,
  a prefix rewind is free (the next step simply says where the sequence ends);
- RMSNorm -> (Skip)SimplifiedLayerNormalization; the LM head runs on the last position only;
- optionally an INT8 KV cache (static per-channel scales the bundle brings,
  kv_scales.safetensors, computed at export by export/kv_scales.py): decode reads the whole cache every step, so at long
  context the cache, not the INT4 weights, dominates the bytes per token; INT8 reads a
  quarter of FP32's. Attention over it is GroupQueryAttention's `kv_cache_bit_width=8` or,
  `attention="edge"`, our own op (csrc/decode_attention.c), which ran decode at 1024
  context at 0.87-0.94x of 64 where GroupQueryAttention ran 0.64-0.88x.

The bundle's files stay the contract: this graph is only a cache, rebuilt when llm.onnx
changes, and tests check it against the bundle graph and the torch reference.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
MS = "com.microsoft"
EDGE_DOMAIN = "edge_vila"  # our custom ops (csrc/, built by native_ops.py)
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")


@dataclass
class Int4Linear:
    q: np.ndarray       # [K, N] uint8 in 0..15
    scale: np.ndarray   # [n_blocks, N] float32
    zero: np.ndarray    # [n_blocks, N] uint8 in 0..15
    block: int
    bias: np.ndarray | None = None

    @property
    def kn(self) -> tuple[int, int]:
        return self.q.shape


def _unpack_int4(raw: bytes, shape) -> np.ndarray:
    raw = np.frombuffer(raw, np.uint8)
    lo, hi = (raw & 0xF), (raw >> 4)
    v = np.stack([lo, hi], -1).reshape(-1)[: int(np.prod(shape))].astype(np.int8)
    v = np.where(v > 7, v - 16, v)  # signed nibbles
    return v.reshape(shape)


class TensorReader:
    """The initializers of an ONNX model loaded without its external data, each read from its
    data file only when asked: the fast graph is built one linear at a time, so a bundle's
    weights are never all in memory at once (loading an 8B llm.onnx whole, then unpacking its
    4-bit codes to a byte each, would take several times its size)."""

    def __init__(self, model, folder: Path):
        self.inits = {i.name: i for i in model.graph.initializer}
        self.folder = Path(folder)

    def __contains__(self, name: str) -> bool:
        return name in self.inits

    def dims(self, name: str) -> tuple[int, ...]:
        return tuple(self.inits[name].dims)

    def raw(self, name: str) -> bytes:
        from onnx import TensorProto

        t = self.inits[name]
        if t.data_location != TensorProto.EXTERNAL:
            return t.raw_data
        info = {e.key: e.value for e in t.external_data}
        path, off = self.folder / info["location"], int(info.get("offset", 0))
        with open(path, "rb") as f:
            f.seek(off)
            data = f.read(int(info["length"])) if "length" in info else f.read()
        if "length" in info and len(data) != int(info["length"]):
            raise ValueError(f"{path}: truncated at {name!r} (offset {off}, {info['length']} bytes expected)")
        return data

    def array(self, name: str) -> np.ndarray:
        from onnx import TensorProto, helper, numpy_helper

        t = self.inits[name]
        if t.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        return np.frombuffer(self.raw(name), helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(tuple(t.dims))


class LazyInt4Linears(dict):
    """base name -> Int4Linear, each read from the bundle and unpacked when looked up (not kept)."""

    def __init__(self, reader: TensorReader, parts: dict[str, dict[str, str]], block_of: dict[str, int]):
        super().__init__({b: p for b, p in parts.items() if "q4" in p and "scale" in p})
        self.reader, self.block_of = reader, block_of

    def __getitem__(self, base: str) -> Int4Linear:
        parts, r = super().__getitem__(base), self.reader
        signed = _unpack_int4(r.raw(parts["q4"]), r.dims(parts["q4"]))
        scale = r.array(parts["scale"]).astype(np.float32)
        if "zcorr" in parts:  # zcorr = s * (8 - z)  ->  z = 8 - zcorr / s
            zc = r.array(parts["zcorr"]).astype(np.float32)
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(scale != 0, 8 - zc / scale, 8)
            zero = np.clip(np.rint(z), 0, 15).astype(np.uint8)
        else:
            zero = np.full(scale.shape, 8, np.uint8)
        bias = r.array(f"lm.{base}.bias").astype(np.float32) if f"lm.{base}.bias" in r else None
        return Int4Linear((signed + 8).astype(np.uint8), scale, zero, self.block_of.get(parts["q4"], 0) or 128, bias)


def read_int4_linears(model, reader: TensorReader) -> LazyInt4Linears:
    """name (e.g. 'model.layers.0.self_attn.q_proj', 'lm_head') -> weights, from the bundle graph
    (each read through `reader` when looked up)."""
    block_of = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and len(n.input) >= 2:
            bs = next((a.i for a in n.attribute if a.name == "block_size"), 0)
            block_of[n.input[0]] = bs
    groups: dict[str, dict[str, str]] = {}
    for name in reader.inits:
        m = re.match(r"(.+)\.(q4|scale|zcorr)__q\d+$", name)
        if m:
            groups.setdefault(m.group(1), {})[m.group(2)] = name
    return LazyInt4Linears(reader, groups, block_of)


def pack_matmulnbits(lin: Int4Linear) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> B [N, n_blocks, block/2] uint8, scales [N * n_blocks], zero_points [N, ceil(n_blocks/2)] uint8."""
    K, N = lin.kn
    bs = lin.block
    nb = -(-K // bs)
    q = np.full((nb * bs, N), 8, np.uint8)
    q[:K] = lin.q
    q = q.T.reshape(N, nb, bs)
    B = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    scales = np.ascontiguousarray(lin.scale.T).reshape(-1).astype(np.float32)
    z = lin.zero.T  # [N, nb]
    if nb % 2:
        z = np.concatenate([z, np.full((N, 1), 8, np.uint8)], 1)
    zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    return B, scales, zp


HEAD_BLOCK = 32  # input channels per scale of the 8-bit head (llama.cpp's Q8_0 block)


def int8_head_supported() -> bool:
    """Whether this onnxruntime's CPU MatMulNBits takes 8-bit weights: from 1.22 on (1.20 and 1.21
    refuse anything but 4 bits when the session is made). Read from the version, not probed: a
    probe graph needs onnx, which a load of a cached fast graph never imports; a test runs the op
    on the installed version and holds it to this rule."""
    import onnxruntime as ort

    m = re.match(r"(\d+)\.(\d+)", ort.__version__)
    return bool(m) and (int(m[1]), int(m[2])) >= (1, 22)


def quantize_head_int8(weight: np.ndarray, rows: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """A float head [V, H] -> 8-bit MatMulNBits weights: B [V, n_blocks, 32] uint8 (code + 128)
    and scales [V * n_blocks] float32, symmetric per block of 32 input channels (max |w| / 127),
    H padded with zeros to whole blocks. `rows` at a time, so the widening to float32 never
    holds the whole table (an 8B model's head is 525M weights)."""
    V, H = weight.shape
    nb = -(-H // HEAD_BLOCK)
    B = np.empty((V, nb, HEAD_BLOCK), np.uint8)
    scales = np.empty((V, nb), np.float32)
    for r in range(0, V, rows):
        chunk = np.zeros((min(rows, V - r), nb * HEAD_BLOCK), np.float32)
        chunk[:, :H] = weight[r:r + rows]
        chunk = chunk.reshape(-1, nb, HEAD_BLOCK)
        s = np.abs(chunk).max(-1) / 127
        q = np.rint(chunk / np.where(s == 0, 1, s)[..., None])
        B[r:r + rows] = (np.clip(q, -127, 127) + 128).astype(np.uint8)
        scales[r:r + rows] = s
    return B, scales.reshape(-1)


def pack_int4_tiles(lin: Int4Linear, half_scales: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Our Int4Linear op's layout (csrc/int4_linear.c): tiles of 16 output rows; per tile and
    block, 64-byte groups holding 8 input channels of each row (row r's 4 bytes at r*4: channel
    c in the low nibble, c+4 in the high one). -> W [tiles, n_blocks, block*8] uint8,
    scales [tiles, n_blocks, 16] (0 past N), zeros [tiles, n_blocks, 16] uint8 or None.

    Decode is bound by the bytes it reads, so the scales are float16 where every one survives
    the rounding to within float16's precision (`half_scales`; else, or for a scale outside its
    range, float32), and a symmetric linear (every zero point 8) has no zeros: at block 32 that
    is 4.5 bits per weight, Q4_0's, instead of 5.25."""
    K, N = lin.kn
    bs = lin.block
    if bs % 8:
        raise ValueError(f"block size {bs} is not a multiple of 8")
    nb, tiles = -(-K // bs), -(-N // 16)
    q = np.full((nb * bs, tiles * 16), 8, np.uint8)
    q[:K, :N] = lin.q
    # [k, n] -> [tile, row, block, group, half, 4] -> [tile, block, group, row, 4, half]
    q = q.T.reshape(tiles, 16, nb, bs // 8, 2, 4).transpose(0, 2, 3, 1, 5, 4)
    W = (q[..., 0] | (q[..., 1] << 4)).reshape(tiles, nb, bs * 8)
    scale = np.zeros((nb, tiles * 16), np.float32)
    scale[:, :N] = lin.scale
    if half_scales and half_exact_enough(scale):
        scale = scale.astype(np.float16)
    zero = np.full((nb, tiles * 16), 8, np.uint8)
    zero[:, :N] = lin.zero
    tile = lambda a: np.ascontiguousarray(a.reshape(nb, tiles, 16).transpose(1, 0, 2))
    return np.ascontiguousarray(W), tile(scale), None if (zero == 8).all() else tile(zero)


def half_exact_enough(scale: np.ndarray) -> bool:
    """Whether float16 holds every scale to its own precision (relative error <= 2^-11): false
    when one is past float16's range or small enough to lose bits as a subnormal."""
    with np.errstate(over="ignore"):
        h = scale.astype(np.float16).astype(np.float32)
    err = np.abs(h - scale)
    return bool(np.isfinite(h).all() and (err <= np.abs(scale) * 2.0 ** -11).all())


def fuse(lins: list[Int4Linear]) -> Int4Linear:
    """Concatenate linears that read the same input along N (q|k|v, gate|up)."""
    if len({l.block for l in lins}) != 1:
        raise ValueError("cannot fuse linears with different block sizes")
    bias = None
    if any(l.bias is not None for l in lins):
        bias = np.concatenate([l.bias if l.bias is not None else np.zeros(l.kn[1], np.float32) for l in lins])
    return Int4Linear(np.concatenate([l.q for l in lins], 1), np.concatenate([l.scale for l in lins], 1),
                      np.concatenate([l.zero for l in lins], 1), lins[0].block, bias)


def _find_rope(reader: TensorReader, max_ctx: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    cos = sin = None
    for i in reader.inits.values():
        if len(i.dims) == 2 and i.dims[1] == head_dim and i.dims[0] >= max_ctx and i.data_type == 1:
            a = reader.array(i.name)
            if np.allclose(a[0], 1.0):
                cos = a
            elif np.allclose(a[0], 0.0) and a.shape[0] > 1 and abs(a[1, 0]) > 0.5:
                sin = a
    if cos is None or sin is None:
        raise ValueError("RoPE tables not found in llm.onnx")
    half = head_dim // 2
    if not np.allclose(cos[:, :half], cos[:, half:]):
        raise ValueError("RoPE tables are not in rotate-half layout")
    return np.ascontiguousarray(cos[:max_ctx, :half]), np.ascontiguousarray(sin[:max_ctx, :half])


def _norm_weights(model, reader: TensorReader) -> list[np.ndarray]:
    """RMSNorm weights in graph order (layer 0 input, layer 0 post-attention, ..., final norm).

    Found by structure, not by name: the exporter merges identical initializers (a randomly
    initialised model has every norm weight equal to ones), so names are not reliable.
    RMSNorm here is ReduceMean -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x) -> Mul(weight)."""
    inits = reader.inits
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = []
    for n in model.graph.node:
        if n.op_type != "ReduceMean":
            continue
        cur = n
        for op in ("Add", "Sqrt", "Reciprocal", "Mul", "Mul"):
            nxt = [c for c in consumers.get(cur.output[0], []) if c.op_type == op]
            if len(nxt) != 1:
                raise ValueError(f"unexpected RMSNorm pattern after {n.name}")
            cur = nxt[0]
        w = [i for i in cur.input if i in inits]
        if len(w) != 1:
            raise ValueError(f"RMSNorm weight not found after {n.name}")
        out.append(reader.array(w[0]).astype(np.float32))
    return out


def _rms_eps(model, reader: TensorReader) -> float:
    from onnx import numpy_helper

    inits = reader.inits
    consts = {n.output[0]: next(a.t for a in n.attribute if a.name == "value") for n in model.graph.node
              if n.op_type == "Constant"}
    means = {n.output[0] for n in model.graph.node if n.op_type == "ReduceMean"}
    for n in model.graph.node:
        if n.op_type == "Add" and n.input[0] in means:
            if n.input[1] in inits:
                return float(reader.array(n.input[1]).reshape(-1)[0])
            if n.input[1] in consts:
                return float(numpy_helper.to_array(consts[n.input[1]]).reshape(-1)[0])
    raise ValueError("RMSNorm epsilon not found in llm.onnx")


def build_fast_llm(bundle_llm: Path, man: dict, out: Path, accuracy_level: int = 4,
                   kv_scales: np.ndarray | None = None, attention: str = "gqa", matmul: str = "nbits",
                   lm_head: str = "float") -> Path:
    try:
        return _build_fast_llm(bundle_llm, man, Path(out), accuracy_level, kv_scales, attention, matmul, lm_head)
    except BaseException:  # no half-written temporaries left beside the cache
        for p in Path(out).parent.glob(f"{Path(out).name}*.{os.getpid()}.tmp"):
            p.unlink(missing_ok=True)
        raise


def _build_fast_llm(bundle_llm: Path, man: dict, out: Path, accuracy_level: int,
                    kv_scales: np.ndarray | None, attention: str, matmul: str, lm_head: str) -> Path:
    """Write the fast graph for `bundle_llm` (the bundle's llm.onnx) to `out` (atomically).
    `kv_scales` ([layers, 2 (key, value), kv_heads, head_dim], the bundle's kv_scales.safetensors)
    makes the KV cache INT8. `attention="edge"` (INT8 cache only) runs attention in our own
    custom op (`native_ops.py`) instead of GroupQueryAttention; its key cache is stored in
    blocks of 64 positions, [1, kv_heads, key_blocks = ceil(max_seq / 64), head_dim, 64].
    `matmul="edge"` runs the INT4 linears in our Int4Linear op (weights in `pack_int4_tiles`'s
    layout, int8 activations per block) instead of MatMulNBits. `lm_head="int8"` rounds a float
    output head to 8-bit weights (`quantize_head_int8`); an INT4 head stays INT4."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = man.model
    H, nh, nkv, hd, L, V = m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.num_layers, m.vocab_size
    max_ctx = m.max_context
    model = onnx.load(str(bundle_llm), load_external_data=False)  # weights are read one at a time
    reader = TensorReader(model, Path(bundle_llm).parent)
    lins = read_int4_linears(model, reader)
    if f"model.layers.0.{PROJ[0]}" not in lins:
        raise ValueError("llm.onnx has no INT4 linears (fp32 bundle): nothing to accelerate")
    norms = _norm_weights(model, reader)
    if len(norms) != 2 * L + 1:
        raise ValueError(f"found {len(norms)} RMSNorms in llm.onnx, expected {2 * L + 1}")
    cos, sin = _find_rope(reader, max_ctx, hd)
    if kv_scales is not None and kv_scales.shape != (L, 2, nkv, hd):
        raise ValueError(f"kv_scales has shape {kv_scales.shape}, expected {(L, 2, nkv, hd)}")
    kv_type = TensorProto.FLOAT if kv_scales is None else TensorProto.INT8
    if attention not in ("gqa", "edge") or (attention == "edge" and kv_scales is None):
        raise ValueError(f"attention {attention!r}: expected 'gqa', or 'edge' with an INT8 cache (kv_scales)")
    if matmul not in ("nbits", "edge"):
        raise ValueError(f"matmul {matmul!r}: expected 'nbits' or 'edge'")
    if lm_head not in ("float", "int8"):
        raise ValueError(f"lm_head {lm_head!r}: expected 'float' or 'int8'")
    eps = _rms_eps(model, reader)
    nodes, weights = [], []
    out.parent.mkdir(parents=True, exist_ok=True)
    # unique temporaries: two processes may build the same cache at once; the last rename wins
    tag = f"{os.getpid()}.tmp"
    tmp, data = out.with_name(f"{out.name}.{tag}"), out.name + ".data"
    data_file = open(out.parent / f"{data}.{tag}", "wb")

    def w(name, arr):
        """An initializer; its bytes go to the data file now (only the graph stays in memory)."""
        arr = np.asarray(arr, order="C")  # (ascontiguousarray would make a 0-d index 1-d)
        if arr.nbytes < 1024:
            weights.append(numpy_helper.from_array(arr, name))
            return name
        data_file.write(b"\0" * (-data_file.tell() % 64))  # aligned, as ORT maps it
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape,
                        data_location=TensorProto.EXTERNAL)
        for k, v in (("location", data), ("offset", str(data_file.tell())), ("length", str(arr.nbytes))):
            t.external_data.add(key=k, value=v)
        data_file.write(memoryview(arr.reshape(-1).view(np.uint8)))
        weights.append(t)
        return name

    def linear(x, lin: Int4Linear, name, skip: str | None = None, norm: str | None = None, total: str | None = None,
              **attrs):
        """The linear's node. Ours can also apply the RMSNorm before it (`norm`, on x + `skip`,
        whose sum it outputs as `total`): (Skip)SimplifiedLayerNormalization folded in."""
        K, N = lin.kn
        if matmul == "edge":
            W, sc, zp = pack_int4_tiles(lin)
            ins = [x, w(f"{name}.W", W), w(f"{name}.scales", sc), w(f"{name}.zeros", zp) if zp is not None else "",
                   w(f"{name}.bias", lin.bias) if lin.bias is not None else "", skip or "", norm or ""]
            while not ins[-1]:
                ins.pop()
            if norm:
                attrs["epsilon"] = eps
            nodes.append(helper.make_node("Int4Linear", ins, [f"{name}.out"] + ([total] if total else []),
                                          domain=EDGE_DOMAIN, K=K, N=N, block_size=lin.block, name=name, **attrs))
            return f"{name}.out"
        assert skip is None and norm is None, "the norm is folded only into our op"
        B, sc, zp = pack_matmulnbits(lin)
        ins = [x, w(f"{name}.B", B), w(f"{name}.scales", sc), w(f"{name}.zp", zp)]
        if lin.bias is not None:
            ins += ["", w(f"{name}.bias", lin.bias)]  # g_idx unused, then bias
        nodes.append(helper.make_node("MatMulNBits", ins, [f"{name}.out"], domain=MS, K=K, N=N, bits=4,
                                      block_size=lin.block, accuracy_level=accuracy_level, name=name))
        return f"{name}.out"

    w("cos_cache", cos)
    w("sin_cache", sin)
    x = "inputs_embeds"
    ins = [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [1, "seq_len", H]),
           helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
           helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, V])]
    fused = matmul == "edge"  # our linear op applies each RMSNorm itself
    normed = x if fused else "l0.in_norm"
    if not fused:
        nodes.append(helper.make_node("SimplifiedLayerNormalization", [x, w("l0.in_w", norms[0])], [normed], axis=-1,
                                      epsilon=eps, name="l0.in_norm"))
    for i in range(L):
        p = f"model.layers.{i}."
        qkv_lin = fuse([lins[p + k] for k in PROJ[:3]])
        if not fused:
            qkv = linear(normed, qkv_lin, f"l{i}.qkv")
        elif i == 0:
            qkv = linear(x, qkv_lin, "l0.qkv", norm=w("l0.in_w", norms[0]))
        else:  # the previous layer's residual add and this layer's input norm
            x = f"l{i}.x"
            qkv = linear(d, qkv_lin, f"l{i}.qkv", skip=f"l{i - 1}.resid", norm=w(f"l{i}.in_w", norms[2 * i]), total=x)
        kv_dims = {"key": [1, nkv, "key_blocks", hd, 64] if attention == "edge" else [1, nkv, "max_seq", hd],
                   "value": [1, nkv, "max_seq", hd]}
        for kind in ("key", "value"):
            ins.append(helper.make_tensor_value_info(f"past_{kind}.{i}", kv_type, kv_dims[kind]))
            outs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", kv_type, kv_dims[kind]))
        attn_outs = [f"l{i}.attn", f"present_key.{i}", f"present_value.{i}"]
        scales = [] if kv_scales is None else [  # [1, kv_heads, 1, head_dim], as both ops read them
            w(f"l{i}.{k}_scale", kv_scales[i, j][None, :, None, :].astype(np.float32)) for j, k in enumerate("kv")]
        if attention == "edge":
            nodes.append(helper.make_node(
                "DecodeAttention", [qkv, f"past_key.{i}", f"past_value.{i}", "seqlens_k", "total_sequence_length",
                                    "cos_cache", "sin_cache", *scales],
                attn_outs, domain=EDGE_DOMAIN, num_heads=nh, kv_num_heads=nkv, scale=float(hd ** -0.5),
                parallel=int(fused), name=f"l{i}.attention"))
        else:
            gqa_in = [qkv, "", "", f"past_key.{i}", f"past_value.{i}", "seqlens_k", "total_sequence_length",
                      "cos_cache", "sin_cache"]
            quant = {}
            if scales:  # inputs 9-11 (position_ids, attention_bias, head_sink) unused
                gqa_in += ["", "", "", *scales]
                quant = dict(kv_cache_bit_width=8, k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL")
            nodes.append(helper.make_node(
                "GroupQueryAttention", gqa_in, attn_outs, domain=MS, num_heads=nh, kv_num_heads=nkv,
                do_rotary=1, rotary_interleaved=0, scale=float(hd ** -0.5), name=f"l{i}.gqa", **quant))
        o = linear(f"l{i}.attn", lins[p + PROJ[3]], f"l{i}.o")
        gu_lin = fuse([lins[p + PROJ[4]], lins[p + PROJ[5]]])
        if fused:
            gu = linear(o, gu_lin, f"l{i}.gate_up", skip=x, norm=w(f"l{i}.post_w", norms[2 * i + 1]), total=f"l{i}.resid")
        else:
            nodes.append(helper.make_node(
                "SkipSimplifiedLayerNormalization", [o, x, w(f"l{i}.post_w", norms[2 * i + 1])],
                [f"l{i}.post_norm", "", "", f"l{i}.resid"], domain=MS, epsilon=eps, name=f"l{i}.post_norm"))
            gu = linear(f"l{i}.post_norm", gu_lin, f"l{i}.gate_up")
        if fused:  # the op applies SwiGLU to gate | up as it reads its input
            d = linear(gu, lins[p + PROJ[6]], f"l{i}.down", activation=1)
        else:
            I = gu_lin.kn[1] // 2
            nodes += [helper.make_node("Split", [gu, w(f"l{i}.split", np.array([I, I], np.int64))],
                                       [f"l{i}.gate", f"l{i}.up"], axis=-1),
                      helper.make_node("Sigmoid", [f"l{i}.gate"], [f"l{i}.sig"]),
                      helper.make_node("Mul", [f"l{i}.gate", f"l{i}.sig"], [f"l{i}.silu"]),
                      helper.make_node("Mul", [f"l{i}.silu", f"l{i}.up"], [f"l{i}.act"])]
            d = linear(f"l{i}.act", lins[p + PROJ[6]], f"l{i}.down")
        if i + 1 < L and fused:
            continue  # the next layer's qkv node adds the residual and norms
        if i + 1 < L:  # the residual add fused with the next layer's input norm
            normed = f"l{i + 1}.in_norm"
            x = f"l{i + 1}.x"
            nodes.append(helper.make_node("SkipSimplifiedLayerNormalization",
                                          [d, f"l{i}.resid", w(f"l{i + 1}.in_w", norms[2 * i + 2])],
                                          [normed, "", "", x], domain=MS, epsilon=eps, name=f"l{i + 1}.in_norm"))
        else:
            x = f"l{i}.out"
            nodes.append(helper.make_node("Add", [d, f"l{i}.resid"], [x]))
    # the head only for the last position
    nodes += [helper.make_node("Gather", [x, w("last", np.array(-1, np.int64))], ["last_h"], axis=1),
              helper.make_node("SimplifiedLayerNormalization", ["last_h", w("final_norm", norms[2 * L])],
                               ["final_h"], axis=-1, epsilon=eps)]
    if "lm_head" in lins:
        nodes.append(helper.make_node("Unsqueeze", ["final_h", w("ax1", np.array([1], np.int64))], ["final_h3"]))
        head = linear("final_h3", lins["lm_head"], "lm_head")
        nodes.append(helper.make_node("Squeeze", [head, "ax1"], ["logits"]))
    else:
        wt = reader.array("lm.lm_head.weight")  # [V, H]; float16 in a bundle of a bf16 model
        if lm_head == "int8":
            B, sc = quantize_head_int8(wt)
            # no zero points: 8-bit MatMulNBits' default is 128, the offset quantize_head_int8 adds
            nodes.append(helper.make_node("MatMulNBits", ["final_h", w("lm_head.B8", B), w("lm_head.scales8", sc)],
                                          ["logits"], domain=MS, K=H, N=V, bits=8, block_size=HEAD_BLOCK,
                                          accuracy_level=accuracy_level, name="lm_head"))
        else:  # one widening copy
            nodes.append(helper.make_node("MatMul", ["final_h", w("lm_head.wT", np.ascontiguousarray(wt.T, np.float32))],
                                          ["logits"]))
    graph = helper.make_graph(nodes, "edge_vila_fast_llm", ins, outs, weights)
    fast = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)]
                             + ([helper.make_opsetid(EDGE_DOMAIN, 1)] if "edge" in (attention, matmul) else []),
                             producer_name="edge-vila", ir_version=10)
    data_file.close()
    # the graph names the final data file: rename the data first and the graph last
    onnx.save_model(fast, str(tmp))
    (out.parent / f"{data}.{tag}").replace(out.parent / data)
    tmp.replace(out)
    log.info("built the fast CPU graph %s", out)
    return out


__all__ = ["build_fast_llm", "read_int4_linears", "pack_matmulnbits", "half_exact_enough", "quantize_head_int8", "int8_head_supported",
           "Int4Linear"]
