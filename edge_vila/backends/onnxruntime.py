"""ONNX Runtime backend: runs the bundle's own ONNX files (the ones TensorRT compiles).

Providers are tried in order TensorRT EP (engine cache inside the bundle) -> CUDA EP ->
CPU. The KV cache stays in ONNX Runtime's memory: each step's `present` outputs are bound
as the next step's `past` inputs (IO binding), so the host never copies the cache; a
rewind for prefix reuse slices it once.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..bundle import BundleConfig
from ..errors import InputError

log = logging.getLogger(__name__)


def _providers(root: Path, want: list[str] | None) -> list:
    import onnxruntime as ort

    avail = set(ort.get_available_providers())
    order = want or ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    out = []
    for p in order:
        if p not in avail:
            continue
        if p == "TensorrtExecutionProvider":
            cache = root / "engines" / "ort-trt"
            cache.mkdir(parents=True, exist_ok=True)
            out.append((p, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                            "trt_fp16_enable": True, "trt_int8_enable": True}))
        else:
            out.append(p)
    if not out:
        raise InputError(f"none of the providers {order} is available (have {sorted(avail)})")
    return out


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, cfg: BundleConfig, max_context: int | None = None, threads: int | None = None,
                 providers: list[str] | None = None, exact: bool = False):
        import onnxruntime as ort
        from safetensors.numpy import load_file

        self.cfg = cfg
        root = cfg.root
        self.max_context = min(max_context or cfg.max_context, cfg.max_context)
        self.hidden_size = cfg.llm.hidden_size
        self.tokens_forwarded = 0
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or int(os.environ.get("EDGE_VILA_THREADS", "0"))
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if exact:  # MatMulNBits' default accuracy level quantizes activations to int8
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        so.add_session_config_entry("session.qdqisint8allowed", "1")  # keep S8 Q/DQ as TensorRT wants it
        provs = _providers(root, providers)
        self.llm = ort.InferenceSession(str(root / "llm.onnx"), so, providers=provs)
        self.vision = ort.InferenceSession(str(root / "vision.onnx"), so, providers=provs) \
            if cfg.is_multimodal else None
        self.embed_table = load_file(str(root / "embed.safetensors"))["embed_tokens"]
        m = cfg.llm
        self._kv_shape = (1, m.num_kv_heads, 0, m.head_dim)
        self._past_names = [i.name for i in self.llm.get_inputs()[2:]]
        self._present_names = [o.name for o in self.llm.get_outputs()[1:]]
        self.reset()

    def reset(self) -> None:
        empty = np.zeros(self._kv_shape, np.float32)
        self.past = [empty] * len(self._past_names)
        self.length = 0

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        return self.embed_table[np.asarray(token_ids, np.int64)].astype(np.float32, copy=False)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        if self.vision is None:
            raise InputError(f"{self.cfg.root}: text-only bundle, it has no vision.onnx")
        return self.vision.run(None, {"pixels": np.ascontiguousarray(pixels, np.float32)})[0]

    def forward(self, embeds: np.ndarray, start: int) -> np.ndarray:
        n = embeds.shape[0]
        if start + n > self.max_context:
            raise InputError(f"position {start + n - 1} beyond the context ({self.max_context})")
        if start < self.length:  # prefix reuse: rewind the cache to `start`
            self.past = [np.ascontiguousarray(p[:, :, :start]) if isinstance(p, np.ndarray)
                         else np.ascontiguousarray(p.numpy()[:, :, :start]) for p in self.past]
        elif start > self.length:
            raise InputError(f"forward at {start} but the cache holds {self.length} positions")
        feeds = {"inputs_embeds": np.ascontiguousarray(embeds[None], np.float32),
                 "position_ids": np.arange(start, start + n, dtype=np.int64)}
        io = self.llm.io_binding()
        for k, v in feeds.items():
            io.bind_cpu_input(k, v)
        for name, p in zip(self._past_names, self.past):
            if isinstance(p, np.ndarray):
                io.bind_cpu_input(name, p)
            else:
                io.bind_ortvalue_input(name, p)
        io.bind_output("logits")
        for name in self._present_names:
            io.bind_output(name)
        self.llm.run_with_iobinding(io)
        outs = io.get_outputs()
        self.past = list(outs[1:])  # stays in ORT memory; bound as input next step
        self.length = start + n
        self.tokens_forwarded += n
        return outs[0].numpy()[0]
