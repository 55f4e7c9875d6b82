"""Rewrite float ONNX graphs into TensorRT's explicit-quantization form.

- LLM, INT4 weight-only: every decoder linear's MatMul(x, W) becomes
  MatMul(x, DequantizeLinear(q - 8 : INT4, s, block_size=g, axis=0)); TensorRT takes only
  zero-point-free (symmetric) INT4, so an asymmetric AWQ weight w = (q - z) s is carried
  *exactly* by adding  ReduceSum_g(x) @ ((8 - z) s)  (one small MatMul per linear).
- Vision, INT8: per-output-channel symmetric INT8 weight DQ, per-tensor symmetric INT8
  Q/DQ on each MatMul / Conv input, biases stay float (no INT32 bias DQ).

Initializers are matched to model weights by content (the exporter renames them).
"""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def pack_int4(a: np.ndarray) -> bytes:
    """Signed 4-bit values -> ONNX INT4 raw bytes (element 0 in the low nibble)."""
    v = (a.astype(np.int8).reshape(-1) & 0xF).astype(np.uint8)
    if len(v) % 2:
        v = np.append(v, np.uint8(0))
    return (v[0::2] | (v[1::2] << 4)).tobytes()


class GraphEditor:
    def __init__(self, model: onnx.ModelProto):
        self.m = model
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.new_nodes: dict[int, list[onnx.NodeProto]] = {}  # index -> nodes inserted before it
        self._n = 0

    def uid(self, base: str) -> str:
        self._n += 1
        return f"{base}__q{self._n}"

    def add_init(self, name: str, arr: np.ndarray | None = None, proto: onnx.TensorProto | None = None) -> str:
        t = proto if proto is not None else numpy_helper.from_array(arr, name)
        t.name = name
        self.g.initializer.append(t)
        return name

    def find_weights(self, weights: dict[str, np.ndarray]) -> dict[str, tuple[int, onnx.NodeProto, str]]:
        """model weight name -> (node index, MatMul/Conv node, initializer name), by content."""
        want = {}
        for name, w in weights.items():
            want[_digest(w)] = name
        found = {}
        for idx, n in enumerate(self.g.node):
            if n.op_type not in ("MatMul", "Conv", "Gemm") or len(n.input) < 2 or n.input[1] not in self.inits:
                continue
            arr = numpy_helper.to_array(self.inits[n.input[1]])
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            key = _digest(arr.T if n.op_type == "MatMul" or (n.op_type == "Gemm" and not trans_b) else arr)
            if key in want:
                found[want[key]] = (idx, n, n.input[1])
        return found

    def drop_unused_initializers(self) -> None:
        used = {i for n in self.g.node for i in n.input}
        keep = [i for i in self.g.initializer if i.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)

    def commit(self) -> None:
        nodes = []
        for idx, n in enumerate(self.g.node):
            nodes.extend(self.new_nodes.get(idx, []))
            nodes.append(n)
        nodes.extend(self.new_nodes.get(len(self.g.node), []))  # after the last node
        del self.g.node[:]
        self.g.node.extend(nodes)
        self.drop_unused_initializers()


def quantize_llm_int4(model: onnx.ModelProto, linears: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                      float_weights: dict[str, np.ndarray], group_size: int) -> tuple[onnx.ModelProto, int]:
    """linears: name -> (codes [out,in] 0..15, scales [out,G], zeros [out,G]); float_weights:
    name -> the float weight [out,in] the exported graph holds (to find its initializer)."""
    ed = GraphEditor(model)
    found = ed.find_weights(float_weights)
    missing = set(linears) - set(found)
    if missing:
        raise RuntimeError(f"could not locate {len(missing)} linears in the exported graph, e.g. {sorted(missing)[:2]}")
    for name, (idx, node, init) in found.items():
        if node.op_type == "Gemm":  # the exporter writes the head as Gemm(x, W, transB=1): make it a MatMul
            if len(node.input) > 2 or any(a.name in ("alpha", "beta") and a.f != 1.0 for a in node.attribute):
                raise RuntimeError(f"{name}: Gemm with bias/alpha/beta cannot take an INT4 weight rewrite")
            node.op_type = "MatMul"
            del node.attribute[:]
        codes, s, z = linears[name]
        out_f, in_f = codes.shape
        G = s.shape[1]
        qT = (codes.astype(np.int16) - 8).T  # [in, out], symmetric INT4
        qn = ed.add_init(ed.uid(name + ".q4"), proto=helper.make_tensor("", TensorProto.INT4, list(qT.shape),
                                                                        pack_int4(qT), raw=True))
        sn = ed.add_init(ed.uid(name + ".scale"), np.ascontiguousarray(s.T.astype(np.float32)))
        w = ed.uid(name + ".w")
        nodes = [helper.make_node("DequantizeLinear", [qn, sn], [w], axis=0, block_size=group_size,
                                  name=ed.uid("dq"))]
        x = node.input[0]
        if (z != 8).any():
            y1 = ed.uid(name + ".y_sym")
            node.output[0], final = y1, node.output[0]
            # block sums of x as a MatMul with a 0/1 [in, G] indicator: works for a short last group
            ind = np.zeros((in_f, G), np.float32)
            ind[np.arange(in_f), np.arange(in_f) // group_size] = 1.0
            bn = ed.add_init(ed.uid(name + ".blocks"), ind)
            corr = ed.add_init(ed.uid(name + ".zcorr"), np.ascontiguousarray(((8.0 - z) * s).T.astype(np.float32)))
            xs, y2 = ed.uid("xsum"), ed.uid("ycorr")
            after = [helper.make_node("MatMul", [x, bn], [xs], name=ed.uid("bs")),
                     helper.make_node("MatMul", [xs, corr], [y2], name=ed.uid("mm")),
                     helper.make_node("Add", [y1, y2], [final], name=ed.uid("add"))]
            ed.new_nodes.setdefault(idx + 1, []).extend(after)
        node.input[1] = w
        ed.new_nodes.setdefault(idx, []).extend(nodes)
    ed.commit()
    return model, len(found)


def quantize_vision_int8(model: onnx.ModelProto, weights: dict[str, np.ndarray], act_scale: dict[str, float],
                         weight_scale: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, int]:
    """weights: module name -> float weight ([out,in] or conv [out,in,kh,kw]) as exported."""
    ed = GraphEditor(model)
    found = ed.find_weights({k: v for k, v in weights.items() if k in act_scale})
    for name, (idx, node, init) in found.items():
        w = numpy_helper.to_array(ed.inits[init])
        ws = weight_scale[name].astype(np.float32)
        axis = 1 if node.op_type == "MatMul" else 0  # output channel: MatMul weights are [in, out]
        shape = [1] * w.ndim
        shape[axis] = -1
        wq = np.clip(np.round(w / ws.reshape(shape)), -128, 127).astype(np.int8)
        qn = ed.add_init(ed.uid(name + ".w8"), wq)
        sn = ed.add_init(ed.uid(name + ".wscale"), ws)
        zn = ed.add_init(ed.uid(name + ".wzero"), np.zeros_like(ws, dtype=np.int8))
        wd = ed.uid(name + ".wdq")
        asn = ed.add_init(ed.uid(name + ".ascale"), np.array(act_scale[name], np.float32))
        azn = ed.add_init(ed.uid(name + ".azero"), np.array(0, np.int8))
        xq, xd = ed.uid(name + ".xq"), ed.uid(name + ".xdq")
        ed.new_nodes.setdefault(idx, []).extend([
            helper.make_node("DequantizeLinear", [qn, sn, zn], [wd], axis=axis, name=ed.uid("dqw")),
            helper.make_node("QuantizeLinear", [node.input[0], asn, azn], [xq], name=ed.uid("qa")),
            helper.make_node("DequantizeLinear", [xq, asn, azn], [xd], name=ed.uid("dqa"))])
        node.input[0], node.input[1] = xd, wd
    ed.commit()
    return model, len(found)
