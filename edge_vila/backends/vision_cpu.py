"""The INT8 ViT on the CPU, accurate on every x86 CPU.

The bundle's vision.onnx is TensorRT's form: symmetric S8 weights and activations (Q/DQ). ORT
runs it fastest with U8 activations, but on x86 CPUs without VNNI its U8S8 GEMM multiplies
with VPMADDUBSW, which adds each pair of u8 x s8 products into a *saturating* int16: 2 x 255 x
127 = 64770 does not fit, and the features' cosine to fp32 fell to 0.94 (mean) on a Zen 3
(issue #25) while the S8 form, which avoids that path, kept 0.9997 at a quarter of the speed.
Two forms avoid it, each derived from the bundle's graph once into the CPU cache beside the
fast LLM graph (verified by the same record.json):

- **edge** (the default on such CPUs with AVX2 and a C compiler): every weight MatMul becomes
  our Int8Linear op (csrc/int8_linear.c), which quantizes each token's activations to 7 bits
  with its own range and zero point ([0, 127]: a VPMADDUBSW pair then sums to at most 2 x 127
  x 127, so nothing saturates) and folds the bias and the GELU. Per-token ranges make up for
  most of the lost bit: random SigLIP-B/16, cosine to fp32 0.9995 mean / 0.9984 min against
  U8U8's 0.99965 / 0.9989, at 1.66x fp32 against U8U8's 1.36x (Zen 3, 2026-12-03). Its
  session runs without ORT's spinning threads, which took the CPU from our pool.
- **u8u8**: the weights stored as uint8 with zero point 128 dequantize to exactly the same
  values, and ORT takes its U8U8 path, which widens both inputs to int16 before multiplying
  (VPMADDWD: nothing saturates). Exact where 7-bit "reduced range" weights are not (on the tiny
  VLM: features' cosine to fp32 0.9989 mean / 0.9981 min with 7-bit weights, 0.9995 / 0.9990 as
  U8U8, the same as U8S8 with VNNI), but ORT's U8U8 GEMM is only ~1.3x its fp32 one on AVX2.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import BundleConfig

log = logging.getLogger(__name__)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


@dataclass(frozen=True)
class VisionKey:
    form: str = "u8u8"
    op_layout: int = 1  # Int8Linear's inputs and weight layout (edge form): bumped when they change


def x86_without_vnni(cpuinfo: str | None = None) -> bool:
    """Whether ORT's U8S8 GEMM here is the saturating pre-VNNI one (x86 without AVX-512 VNNI
    or AVX-VNNI). aarch64's kernels widen before they add: never."""
    from .native_ops import cpu_flags

    if platform.machine() not in ("x86_64", "AMD64", "i686"):
        return False
    return not any(f in cpu_flags(cpuinfo) for f in VNNI_FLAGS)


def edge_form_possible() -> bool:
    """Whether this CPU runs Int8Linear's AVX2 loops and a C compiler can build the op library."""
    from .native_ops import _compiler, cpu_flags

    return platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= cpu_flags() and _compiler() is not None


def resolve(option: str, exact: bool) -> str:
    """The form the CPU runs: `option` unless auto; auto is s8 when exact; on x86 without VNNI
    edge where it can be built (else u8u8); else u8. A forced u8 where U8S8 saturates is kept,
    with a warning."""
    if option == "u8" and x86_without_vnni():
        log.warning("vision_int8='u8' on an x86 CPU without VNNI: ORT's U8S8 GEMM saturates here "
                    "(image features' cosine to fp32 fell to 0.94 on a Zen 3); 'auto' picks edge or u8u8")
    if option != "auto":
        return option
    if exact:
        return "s8"
    if not x86_without_vnni():
        return "u8"
    return "edge" if edge_form_possible() else "u8u8"


def to_u8u8(model) -> int:
    """Rewrite, in place, every weight DequantizeLinear (int8 initializer input) to uint8 values
    q + 128 with zero point 128: the same dequantized weights exactly, so ORT's CPU kernels take
    their U8U8 path (inputs widened to int16 before VPMADDWD: nothing saturates) instead of U8S8.
    Returns how many weights; activation Q/DQ pairs are left as they are."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    used = {}
    for node in model.graph.node:
        for i in node.input:
            used[i] = used.get(i, 0) + 1
    done = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or node.input[1] not in inits:
            continue
        q_t = inits[node.input[0]]
        q = numpy_helper.to_array(q_t)
        if q.dtype != np.int8:
            continue
        if used[node.input[0]] != 1:
            raise ValueError(f"vision.onnx: weight {node.input[0]} feeds {used[node.input[0]]} nodes")
        scale = numpy_helper.to_array(inits[node.input[1]])
        if len(node.input) > 2 and node.input[2]:
            zp = numpy_helper.to_array(inits[node.input[2]])
            if np.any(zp != 0):
                raise ValueError(f"vision.onnx: weight {node.input[0]} is not symmetric (zero point {zp.ravel()[:4]})")
        q_t.CopyFrom(numpy_helper.from_array((q.astype(np.int16) + 128).astype(np.uint8), q_t.name))
        zp_name = f"{node.input[0]}__zp_u8"
        model.graph.initializer.append(numpy_helper.from_array(np.full(scale.shape, 128, np.uint8), zp_name))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = zp_name
        done += 1
    still = {i for n in model.graph.node for i in n.input}
    dead = [t for t in model.graph.initializer if t.name not in still]  # the int8 zero points replaced
    for t in dead:
        model.graph.initializer.remove(t)
    return done


def pack_int8_panels(q: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Int8Linear's weight layout (csrc/int8_linear.c) from a MatMul's int8 B [K, N] and its
    per-output-channel scales [N]: panels of 16 output channels, per 4 input channels 64 bytes
    (channels 0-7 then 8-15, 4 consecutive input channels each), K padded to 4 and N to 16 with
    zeros; returns (W [panels, Kp * 16], scales [panels * 16], each output channel's weight sum
    int32 [panels * 16]: the op's correction for its activations' zero point)."""
    K, N = q.shape
    if q.dtype != np.int8 or scale.shape != (N,):
        raise ValueError(f"Int8Linear weights: int8 [K, N] with N scales expected, got {q.dtype} {q.shape}, "
                         f"scales {scale.shape}")
    # -128 is fine: a 7-bit activation pair sums to at most 2 x 127 x 128 = 32512 in VPMADDUBSW's int16
    Kp, Np = -(-K // 4) * 4, -(-N // 16) * 16
    w = np.zeros((Kp, Np), np.int8)
    w[:K, :N] = q
    panels = w.reshape(Kp // 4, 4, Np // 16, 2, 8).transpose(2, 0, 3, 4, 1).reshape(Np // 16, Kp * 16)
    s = np.zeros(Np, np.float32)
    s[:N] = scale
    return np.ascontiguousarray(panels), s, w.astype(np.int32).sum(0).astype(np.int32)


def to_edge_int8(model) -> int:
    """Rewrite, in place, every MatMul of activations (a Q/DQ pair) by per-channel symmetric INT8
    weights (a DequantizeLinear of an int8 initializer) into our Int8Linear, folding a following
    bias Add and a GELU (tanh form) into it; the activations' static Q/DQ is dropped (the op
    quantizes each row itself). Returns how many linears; the attention's MatMuls stay as they are."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    cons: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    gone, new_inits, done = set(), [], 0
    replace: dict[int, object] = {}

    def only(name: str, op: str):
        c = cons.get(name, [])
        return c[0] if len(c) == 1 and c[0].op_type == op and name not in outputs else None

    for n in g.node:
        if n.op_type != "MatMul":
            continue
        dw, da = prod.get(n.input[1]), prod.get(n.input[0])
        if dw is None or dw.op_type != "DequantizeLinear" or dw.input[0] not in inits or da is None or \
                da.op_type != "DequantizeLinear" or da.input[0] not in prod or prod[da.input[0]].op_type != "QuantizeLinear":
            continue
        q = numpy_helper.to_array(inits[dw.input[0]])
        scale = numpy_helper.to_array(inits[dw.input[1]]).astype(np.float32)
        axis = next((a.i for a in dw.attribute if a.name == "axis"), 1)
        zp = numpy_helper.to_array(inits[dw.input[2]]) if len(dw.input) > 2 and dw.input[2] else None
        if q.dtype != np.int8 or q.ndim != 2 or (zp is not None and np.any(zp != 0)) or len(cons[dw.output[0]]) != 1:
            continue
        if scale.ndim == 0:
            scale = np.full(q.shape[1], float(scale), np.float32)
        elif axis not in (1, -1) or scale.shape != (q.shape[1],):
            continue
        K, N = q.shape
        w, s, sums = pack_int8_panels(q, scale)
        base = n.name or n.output[0]
        ins = [prod[da.input[0]].input[0], f"{base}__w8", f"{base}__s8", f"{base}__sum8"]
        new_inits += [numpy_helper.from_array(w, ins[1]), numpy_helper.from_array(s, ins[2]),
                      numpy_helper.from_array(sums, ins[3])]
        out, last = n.output[0], [n]
        add = only(out, "Add")
        if add is not None:
            other = add.input[1] if add.input[0] == out else add.input[0]
            b = numpy_helper.to_array(inits[other]) if other in inits else None
            if b is not None and b.shape == (N,) and b.dtype == np.float32:
                ins.append(other)
                out = add.output[0]
                last.append(add)
        act = 0
        gelu = only(out, "Gelu")
        if gelu is not None and any(a.name == "approximate" and a.s == b"tanh" for a in gelu.attribute):
            act, out = 1, gelu.output[0]
            last.append(gelu)
        node = helper.make_node("Int8Linear", ins, [out], name=f"{base}__int8", domain="edge_vila", K=K, N=N,
                                activation=act)
        replace[id(last[-1])] = node
        gone.update(id(x) for x in last[:-1])
        gone.add(id(dw))
        done += 1
    nodes = [replace.get(id(x), x) for x in g.node if id(x) not in gone]
    # activation Q/DQ pairs (and weights) no longer read by anything
    while True:
        used = {i for x in nodes for i in x.input} | outputs
        keep = [x for x in nodes if x.op_type not in ("QuantizeLinear", "DequantizeLinear") or
                any(o in used for o in x.output)]
        if len(keep) == len(nodes):
            break
        nodes = keep
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    used = {i for x in g.node for i in x.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    if done and not any(o.domain == "edge_vila" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("edge_vila", 1))
    return done


def derived_graph(cfg: BundleConfig, form: str) -> Path:
    """The bundle's vision.onnx in `form` ("u8u8": uint8 weights with zero point 128; "edge": our
    Int8Linear op), from the CPU cache (built on first use)."""
    from .cpu_cache import build_where_writable, cache_folders, find_verified, write_record

    if form not in ("u8u8", "edge"):
        raise ValueError(f"vision form {form!r}: u8u8 or edge expected")
    rewrite, what = (to_u8u8, "uint8 weights") if form == "u8u8" else (to_edge_int8, "Int8Linear")
    key = VisionKey(form)
    src = cfg.manifest.files["vision.onnx"]
    sources = {"vision.onnx": src}
    folders = cache_folders(cfg, f"vision-{hashlib.sha256(src.encode()).hexdigest()[:16]}-{key.form}")
    found = find_verified(folders, sources, key, "vision graph")
    if found:
        return found / "vision.onnx"

    def build_in(folder: Path) -> Path:
        import onnx

        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        t0 = time.perf_counter()
        model = onnx.load(str(cfg.root / "vision.onnx"))
        n = rewrite(model)
        if n == 0:
            raise ValueError(f"{cfg.root / 'vision.onnx'}: no INT8 weight found to rewrite ({form} form)")
        tmp = folder / f"vision.onnx.{os.getpid()}.tmp"
        onnx.save(model, str(tmp))
        tmp.replace(folder / "vision.onnx")
        write_record(folder, f"ort-cpu vision graph, {what}", key, sources, t0, weights_rewritten=n)
        log.info("derived the %s INT8 ViT for this CPU (no VNNI) in %s", form, folder)
        return folder / "vision.onnx"

    return build_where_writable(folders, "vision graph", build_in)


def u8u8_graph(cfg: BundleConfig) -> Path:
    """derived_graph(cfg, "u8u8")."""
    return derived_graph(cfg, "u8u8")


__all__ = ["x86_without_vnni", "edge_form_possible", "resolve", "to_u8u8", "to_edge_int8", "pack_int8_panels",
           "derived_graph", "u8u8_graph", "VisionKey"]
