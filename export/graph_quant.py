"""Rewrite the float vision graph into TensorRT's explicit-quantization form (the LLM's
INT4 form is written directly by llm_onnx.py).

- Vision, INT8: per-output-channel symmetric INT8 weight DQ, per-tensor symmetric INT8
  Q/DQ on each MatMul / Conv input, biases stay float (no INT32 bias DQ).

Initializers are matched to model weights by content (the exporter renames them).
"""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


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
