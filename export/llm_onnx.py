"""llm.onnx: inputs_embeds + position_ids + past K/V -> last-position logits + present K/V.

Exported with torch.onnx.export(dynamo=True) over a wrapper that takes and returns flat
tensors, with named dynamic dims. Token embeddings stay outside (embed.safetensors, looked
up on the host) so image embeddings splice in without graph surgery; RoPE cos/sin are
gathered from a table by position inside the graph.
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from edge_vila.config import LLMSpec
from edge_vila.errors import CheckpointError
from edge_vila.modeling.llm import DecoderLM, rope_tables, rotate_half
from edge_vila.modeling.weights import CheckpointWeights
from edge_vila.quantfmt import unpack_cols

log = logging.getLogger(__name__)


class FlatDecoder(nn.Module):
    """Stateless decoder step for export: no cache buffers, past K/V in, present out."""

    def __init__(self, lm: DecoderLM, max_context: int):
        super().__init__()
        self.lm = lm
        self.n_layers = lm.spec.num_layers
        lm.drop_cache()
        lm.set_rope(max_context)
        self.register_buffer("cos_table", lm.rope_cos.clone(), persistent=False)
        self.register_buffer("sin_table", lm.rope_sin.clone(), persistent=False)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
        B, T, _ = inputs_embeds.shape
        P = past[0].shape[2]
        cos = self.cos_table[position_ids][None, None]
        sin = self.sin_table[position_ids][None, None]
        # causal over the new tokens, everything in the past visible
        i = torch.arange(T, device=inputs_embeds.device)[:, None]
        j = torch.arange(P + T, device=inputs_embeds.device)[None, :]
        mask = j <= (i + P)
        h = inputs_embeds
        presents = []
        for li, layer in enumerate(self.lm.model.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(B, T, a.nh, a.hd).transpose(1, 2)
            k = a.k_proj(x).view(B, T, a.nkv, a.hd).transpose(1, 2)
            v = a.v_proj(x).view(B, T, a.nkv, a.hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            # the cache in its I/O dtype (float16 in the bundle: half an Orin's KV bytes); the new
            # positions are rounded to it before attention too, so a prompt gives the same
            # answer whether it is prefilled at once or token by token
            k = torch.cat([past[2 * li], k.to(past[2 * li].dtype)], dim=2)
            v = torch.cat([past[2 * li + 1], v.to(past[2 * li + 1].dtype)], dim=2)
            presents += [k, v]
            k, v = k.float(), v.float()
            # GQA without repeating K/V (which would copy the cache g times per step): the g
            # query heads sharing a KV head are stacked along the query axis instead
            g = a.nh // a.nkv
            qg = q.reshape(B, a.nkv, g * T, a.hd)
            y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask.repeat(g, 1) if g > 1 else mask)
            y = y.reshape(B, a.nh, T, a.hd)
            h = h + a.o_proj(y.transpose(1, 2).reshape(B, T, a.nh * a.hd))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.lm.lm_head(self.lm.model.norm(h[:, -1]))
        return (logits, *presents)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kind}.{i}" for i in range(n_layers) for kind in ("key", "value")]
    present = [f"present_{kind}.{i}" for i in range(n_layers) for kind in ("key", "value")]
    return ["inputs_embeds", "position_ids", *past], ["logits", *present]


KV_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def trace_graph(spec: LLMSpec, max_context: int, opset: int = 21, kv_dtype: str = "fp16"):
    """The decoder's ONNX graph without weights: traced on the meta device (no memory for
    parameters at any model size), optimised with every parameter as a graph input (so the
    optimiser cannot fold or merge them), -> (onnx_ir Model, the parameter inputs by name)."""
    import onnxscript

    with torch.device("meta"):
        lm = DecoderLM(spec)
        wrapper = FlatDecoder(lm, max_context).eval()
    wrapper.cos_table, wrapper.sin_table = wrapper.cos_table.to("meta"), wrapper.sin_table.to("meta")
    s = spec
    T, P = 3, 5
    meta = dict(device="meta")
    args = (torch.empty(1, T, s.hidden_size, **meta), torch.arange(P, P + T, **meta),
            *[torch.empty(1, s.num_kv_heads, P, s.head_dim, dtype=KV_DTYPES[kv_dtype], **meta)
              for _ in range(2 * s.num_layers)])
    ins, outs = io_names(s.num_layers)
    seq = torch.export.Dim("seq_len", min=1, max=max_context)
    past = torch.export.Dim("past_len", min=0, max=max_context)
    shapes = {"inputs_embeds": {1: seq}, "position_ids": {0: seq},
              "past": tuple({2: past} for _ in range(2 * s.num_layers))}
    with torch.no_grad():
        prog = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset, input_names=ins, output_names=outs,
                                 dynamic_shapes=shapes, optimize=False, verbose=False)
    model = prog.model
    g = model.graph
    params = {}
    for name, v in list(g.initializers.items()):
        v.const_value = None
        g.initializers.pop(name)
        g.inputs.append(v)
        params[name] = v
    onnxscript.optimizer.optimize(model)
    return model, {k: v for k, v in params.items() if v in g.inputs}


def _lazy(name: str, dtype, shape, fn):
    """An initializer whose bytes are produced when the file is written, then dropped."""
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype),
                    const_value=ir.LazyTensor(lambda: ir.Tensor(fn(), dtype=dtype), dtype, ir.Shape(shape), name=name))


def _int4_q(w: CheckpointWeights, base: str) -> np.ndarray:
    codes, _, _ = w.int4(base)
    return np.ascontiguousarray((codes.astype(np.int8) - 8).T).astype(ml_dtypes.int4)


def _int4_scale(w: CheckpointWeights, base: str) -> np.ndarray:
    return np.ascontiguousarray(w.int4(base)[1].T, np.float32)


def _int4_zcorr(w: CheckpointWeights, base: str) -> np.ndarray:
    _, s, z = w.int4(base)
    return np.ascontiguousarray(((8.0 - z) * s).T, np.float32)


def export_llm(spec: LLMSpec, weights: CheckpointWeights, out: Path, max_context: int, opset: int = 21,
               kv_dtype: str = "fp16", head_dtype: str = "fp32") -> dict:
    """Write llm.onnx + llm.onnx.data: the traced graph with the checkpoint's weights bound
    tensor by tensor. AutoAWQ linears become symmetric INT4 block DequantizeLinear ->
    MatMul (TensorRT's weight-only form) and asymmetric zero points are carried exactly by
    ReduceSum_g(x) @ ((8 - z)·s); float linears are stored transposed for MatMul. A float
    LM head with `head_dtype="fp16"` is stored float16 and Cast to float32 in the graph
    (ONNX Runtime folds the Cast at load; the math is the fp32 head's on fp16-exact values).
    Only one tensor is in memory at a time while the file is written."""
    if head_dtype not in ("fp16", "fp32", "int4"):
        raise ValueError(f"head_dtype {head_dtype!r} (expected fp16, fp32 or int4)")
    model, params = trace_graph(spec, max_context, opset, kv_dtype)
    g = model.graph
    cos, sin = (a.numpy() for a in rope_tables(spec, max_context))
    blocks: dict[tuple[int, int], ir.Value] = {}
    n_int4, n_uid = 0, 0
    for pname, v in params.items():
        g.inputs.remove(v)
        if pname in ("cos_table", "sin_table"):
            arr = cos if pname == "cos_table" else sin
            v.const_value = ir.Tensor(np.ascontiguousarray(arr, np.float32), name=pname)
            g.register_initializer(v)
            continue
        key = pname.removeprefix("lm.")
        base = key.removesuffix(".weight")
        users = list(v.uses())
        if key.endswith(".weight") and weights.is_int4(base):
            n_uid += 1
            mm = _consuming_matmul(v, key)
            codes_shape = weights.shape(base + ".qweight")  # [in, out / 8]
            in_f, out_f = codes_shape[0], codes_shape[1] * 8
            G = weights.shape(base + ".scales")[0]
            gs = int((spec.quantization or {}).get("group_size") or 128)  # not ceil(in / G): short last groups
            if G != -(-in_f // gs):
                raise CheckpointError(f"{weights.folder}: {base} has {G} scale groups, group size {gs} needs "
                                      f"{-(-in_f // gs)} for {in_f} inputs")
            q = _lazy(f"{base}.q4__q{n_uid}", ir.DataType.INT4, [in_f, out_f], partial(_int4_q, weights, base))
            sc = _lazy(f"{base}.scale__q{n_uid}", ir.DataType.FLOAT, [G, out_f], partial(_int4_scale, weights, base))
            for t in (q, sc):
                g.register_initializer(t)
            wdq = ir.node("DequantizeLinear", [q, sc], {"axis": 0, "block_size": gs}, name=f"{base}.dq")
            x = mm.inputs[0]
            g.insert_before(mm, wdq)
            old_w = mm.inputs[1]
            mm.replace_input_with(1, wdq.outputs[0])
            if mm.op_type == "Gemm":  # the exporter writes the head as Gemm(x, W, transB=1)
                mm = _gemm_to_matmul(g, mm, key)
            if old_w is not None and old_w.producer() is not None and not list(old_w.uses()):
                g.remove(old_w.producer(), safe=True)
            # only the zero points decide whether a correction is needed: read them alone
            # (the codes are unpacked once, when the data file is written)
            if (unpack_cols(weights.get(base + ".qzeros").numpy()) != 8).any():
                if (in_f, gs) not in blocks:  # 0/1 [in, G] indicator: block sums as one MatMul
                    ind = np.zeros((in_f, G), np.float32)
                    ind[np.arange(in_f), np.arange(in_f) // gs] = 1.0
                    blocks[(in_f, gs)] = ir.Value(name=f"blocks_{in_f}_g{gs}", shape=ir.Shape(ind.shape),
                                                  type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.Tensor(ind))
                    g.register_initializer(blocks[(in_f, gs)])
                zc = _lazy(f"{base}.zcorr__q{n_uid}", ir.DataType.FLOAT, [G, out_f], partial(_int4_zcorr, weights, base))
                g.register_initializer(zc)
                y = mm.outputs[0]
                xs = ir.node("MatMul", [x, blocks[(in_f, gs)]], name=f"{base}.blocksum")
                yc = ir.node("MatMul", [xs.outputs[0], zc], name=f"{base}.zcorr_mm")
                add = ir.node("Add", [y, yc.outputs[0]], name=f"{base}.add_zcorr")
                _reroute(y, add.outputs[0])
                add.replace_input_with(0, y)
                g.insert_after(mm, [xs, yc, add])
            n_int4 += 1
            continue
        if key == "lm_head.weight":
            key = weights.head_name(spec.tie_word_embeddings)  # a tied head (NVILA-Lite) is the embedding table
        shape = weights.shape(key) if key in weights else None
        if shape is None:
            raise CheckpointError(f"{weights.folder}: tensor {key!r} not found (config.json expects it)")
        if tuple(shape) != tuple(v.shape.numpy()):
            raise CheckpointError(f"{weights.folder}: {key} is {list(shape)}, config.json says {list(v.shape.numpy())}")
        half = head_dtype == "fp16" and pname.removeprefix("lm.") == "lm_head.weight"
        ir_dt = ir.DataType.FLOAT16 if half else ir.DataType.FLOAT
        tr = [u.node for u in users if u.node.op_type == "Transpose"]
        if len(shape) == 2 and tr and len(tr) == len(users):  # a float linear: store W^T, drop the Transposes
            wt = _lazy(pname + ".T", ir_dt, [shape[1], shape[0]],
                       partial(lambda k, h: np.ascontiguousarray(_stored(weights, k, h).T), key, half))
            g.register_initializer(wt)
            src = _cast_to_float(g, wt) if half else wt
            for t in tr:
                t.outputs[0].replace_all_uses_with(src)
                g.remove(t, safe=True)
            continue
        if half:
            v.name = pname + ".unused"
            w16 = _lazy(pname, ir_dt, list(shape), partial(_stored, weights, key, True))
            g.register_initializer(w16)
            v.replace_all_uses_with(_cast_to_float(g, w16))
            continue
        v.const_value = ir.LazyTensor(partial(lambda k: ir.Tensor(weights.float32(k)), key), ir.DataType.FLOAT,
                                      ir.Shape(shape), name=pname)
        g.register_initializer(v)
    _save(model, out)
    return {"int4_linears": n_int4}


def _stored(weights: CheckpointWeights, key: str, half: bool) -> np.ndarray:
    """A float tensor as float16 (converted from its 16-bit storage: no float32 copy of an 8B
    head) or float32."""
    return weights.get(key).to(torch.float16).numpy() if half else weights.float32(key)


def _cast_to_float(g, init: ir.Value) -> ir.Value:
    """Cast(init) -> float32, placed first in the graph; returns the cast's output."""
    cast = ir.node("Cast", [init], {"to": ir.DataType.FLOAT}, name=init.name + ".to_fp32")
    g.insert_before(next(iter(g)), cast)
    return cast.outputs[0]


def _consuming_matmul(v, key: str):
    """The MatMul (through a Transpose) or Gemm(transB=1) that applies weight `v`."""
    for u in v.uses():
        n = u.node
        if n.op_type == "Gemm" and u.idx == 1:
            return n
        if n.op_type == "Transpose":
            mms = [c.node for c in n.outputs[0].uses() if c.node.op_type == "MatMul" and c.idx == 1]
            if len(mms) == 1:
                return mms[0]
    raise RuntimeError(f"{key}: the traced graph does not apply it as MatMul(x, W^T) or Gemm(x, W, transB=1)")


def _reroute(old, new) -> None:
    """Every use of `old` (a graph output too, keeping its name) now reads `new`."""
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if new.is_graph_output():
        old.name, new.name = name + "_pre", name


def _gemm_to_matmul(g, gemm, key: str):
    a = gemm.attributes
    if len(gemm.inputs) > 2 or a.get_float("alpha", 1.0) != 1.0 or a.get_float("beta", 1.0) != 1.0 \
            or a.get_int("transA", 0):
        raise RuntimeError(f"{key}: Gemm with bias/alpha/beta/transA cannot take an INT4 weight rewrite")
    mm = ir.node("MatMul", list(gemm.inputs), name=gemm.name)
    g.insert_before(gemm, mm)
    _reroute(gemm.outputs[0], mm.outputs[0])
    for i in range(len(gemm.inputs)):
        gemm.replace_input_with(i, None)
    g.remove(gemm, safe=True)
    return mm


def _save(model, out: Path) -> None:
    """llm.onnx with its weights in llm.onnx.data (protobuf's 2 GB limit; TensorRT's parser
    and ONNX Runtime read the data file from beside the model)."""
    data = out.with_name(out.name + ".data")
    for f in (out, data):
        f.unlink(missing_ok=True)
    from edge_vila.progress import tqdm

    bar = tqdm(desc="llm.onnx weights", unit="tensor", total=len(model.graph.initializers))

    def step(tensor, info) -> None:  # called once per tensor as it is written
        bar.update(1)

    try:
        ir.save(model, out, external_data=data.name, size_threshold_bytes=1024, max_workers=1, callback=step)
    finally:
        bar.close()
