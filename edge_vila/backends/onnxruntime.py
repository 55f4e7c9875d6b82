"""ONNX Runtime backend: runs the bundle's own ONNX files (the ones TensorRT compiles).

Providers are tried in order TensorRT EP (engine cache inside the bundle) -> CUDA EP ->
CPU. On the CPU the backend runs a private, faster graph derived from the bundle's
llm.onnx (ort_fast.py: MatMulNBits + attention over one preallocated KV buffer that decode
steps write in place; rewinds are free), cached and verified by cpu_cache.py. Over the
default INT8 cache (its scales come with the bundle), attention and the INT4
linears are our own custom ops (native_ops.py) when a C compiler can build them (the linear
only where it has its AVX-512 VNNI kernel), else GroupQueryAttention and MatMulNBits.
`variant="bundle"` runs the bundle's own graph instead: there each step's `present` outputs
are bound as the next step's `past` inputs (IO binding), so the host never copies the cache;
a rewind slices it once.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..bundle import BundleConfig
from ..errors import InputError
from ..options import RuntimeOptions
from . import BundleBackend
from . import vision_cpu
from .cpu_cache import KV_SCALES_FILE, FastGraphKey, fast_graph, has_kv_scales
from .ort_fast import int8_head_supported

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


class OrtBackend(BundleBackend):
    name = "onnxruntime"

    def __init__(self, cfg: BundleConfig, options: RuntimeOptions | None = None, providers: list[str] | None = None):
        import onnxruntime as ort
        o = options or RuntimeOptions()
        exact, variant, kv_cache, attention, matmul = o.exact, o.variant, o.kv_cache, o.attention, o.matmul
        self.cfg = cfg
        root = cfg.root
        self.max_context = min(o.max_context or cfg.max_context, cfg.max_context)
        self.hidden_size = cfg.llm.hidden_size
        self.tokens_forwarded = 0
        so = ort.SessionOptions()
        so.intra_op_num_threads = o.threads or int(os.environ.get("EDGE_VILA_THREADS", "0"))
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if exact:  # MatMulNBits' default accuracy level quantizes activations to int8
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        provs = _providers(root, providers)
        cpu_only = all((p if isinstance(p, str) else p[0]) == "CPUExecutionProvider" for p in provs)
        self.vision = self.projector = None
        if cfg.is_multimodal:
            vso = ort.SessionOptions()
            vso.intra_op_num_threads = so.intra_op_num_threads
            vso.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # S8 Q/DQ is what TensorRT wants but runs slowly on ORT's CPU kernels; unless asked for the
            # bundle graph as-is, let ORT rewrite it to U8 activations (its fast CPU path), with uint8
            # weights (U8U8) where its U8S8 int16 pair sums saturate (vision_cpu.py)
            vision_path = root / "vision.onnx"
            self.vision_int8 = None
            if cfg.manifest.quant.get("vision") == "int8":
                form = "s8" if not cpu_only or variant == "bundle" else vision_cpu.resolve(o.vision_int8, exact)
                if form == "edge":
                    from . import native_ops
                    try:
                        lib = native_ops.build_library()
                    except (RuntimeError, OSError) as e:
                        if o.vision_int8 == "edge":
                            raise InputError(f"vision_int8='edge': {e}") from None
                        log.warning("INT8 ViT: our Int8Linear op cannot be built here (%s): U8U8 form", e)
                        form = "u8u8"
                    else:
                        vision_path = vision_cpu.derived_graph(cfg, "edge")
                        vso.register_custom_ops_library(str(lib))
                        native_ops.set_threads(lib, so.intra_op_num_threads)
                        # ORT's workers spin between nodes and took the CPU from our pool (0.98x
                        # fp32 with spinning, 1.66x without, on a 2-core Zen 3)
                        vso.add_session_config_entry("session.intra_op.allow_spinning", "0")
                if form == "u8u8":
                    vision_path = vision_cpu.u8u8_graph(cfg)
                self.vision_int8 = form
            if self.vision_int8 in (None, "s8"):
                vso.add_session_config_entry("session.qdqisint8allowed", "1")
            self.vision = ort.InferenceSession(str(vision_path), vso, providers=provs)
            if "projector.onnx" in cfg.manifest.files:  # dynamic_s2: the projector runs after the host merge
                self.projector = ort.InferenceSession(str(root / "projector.onnx"), vso, providers=provs)
        self._load_embeddings(root)
        fast, level = None, 0 if exact else 4
        want_fast = variant == "fast" or (variant == "auto" and cpu_only and
                                          cfg.manifest.quant.get("llm") == "awq-w4")
        if kv_cache == "int8" and not want_fast:
            raise InputError(f"{root}: an INT8 KV cache needs the fast CPU graph (INT4 bundle, CPU provider)")
        if o.lm_head == "int8" and not want_fast:
            raise InputError(f"{root}: an INT8 output head needs the fast CPU graph (INT4 bundle, CPU provider)")
        self.kv_cache, self.attention, self.matmul, self.lm_head = "fp32", None, None, None
        kv8 = want_fast and (kv_cache == "int8" or (kv_cache == "auto" and not exact))
        if kv8 and not has_kv_scales(cfg):  # scales are computed at export; a load never calibrates
            if kv_cache == "int8":
                raise InputError(f"{root}: no {KV_SCALES_FILE} (exported by an older edge-vila), so no INT8 KV "
                                 "cache; re-export the bundle")
            log.warning("%s: no %s (exported by an older edge-vila): FP32 KV cache; re-export for INT8",
                        root, KV_SCALES_FILE)
            kv8 = False
        if "edge" in (attention, matmul) and not kv8:
            raise InputError(f"{root}: the edge ops need the INT8 KV cache of the fast CPU graph")
        lib, mm, attn, choice = None, False, "gqa", None
        if kv8 and (attention != "gqa" or (matmul != "nbits" and not exact)):  # our ops (native_ops.py)
            from . import native_ops
            explicit = "edge" in (attention, matmul)
            try:
                lib = native_ops.build_library() if explicit else native_ops.try_build_library()
            except (RuntimeError, OSError) as e:  # asked for explicitly: say why it cannot be had
                raise InputError(f"{'attention' if attention == 'edge' else 'matmul'}='edge': {e}") from None
            if lib and "auto" in (matmul, attention):  # ours by default only where it measured faster here
                from .op_choice import choose, shape_of
                choice = choose(lib, shape_of(cfg, so.intra_op_num_threads))
            mm = bool(lib) and not exact and (matmul == "edge" or (matmul == "auto" and choice.matmul == "edge"))
            attn = "edge" if lib and (attention == "edge" or (attention == "auto" and choice.attention == "edge")) \
                else "gqa"
        if kv8 and attn == "gqa" and not (choice and choice.attention == "gqa"):  # a measured gqa ran here
            lib, attn, kv8 = self._without_int8_gqa(root, lib, attention, kv_cache, attn, kv8)
        # a float head at a quarter of its bytes (decode reads it whole every token: Qwen2's
        # 152k-row table is more than NVILA-Lite-2B's INT4 decoder); an INT4 head stays as it is
        int4_head = cfg.manifest.io.get("llm", {}).get("head_dtype") == "int4"
        head8 = want_fast and (o.lm_head == "int8" or (o.lm_head == "auto" and not exact)) and not int4_head
        if head8 and not int8_head_supported():
            if o.lm_head == "int8":
                raise InputError(f"lm_head='int8' needs onnxruntime 1.22 or later (8-bit MatMulNBits); this is "
                                 f"{ort.__version__}")
            log.info("onnxruntime %s has no 8-bit MatMulNBits (1.22+): the output head stays float", ort.__version__)
            head8 = False
        if want_fast:
            self.fast_key = FastGraphKey(level, kv8, attn, "edge" if mm else "nbits", "int8" if head8 else "float")
            fast = fast_graph(cfg, self.fast_key, required=variant == "fast" or kv_cache == "int8")
        self.fast_graph = fast
        if fast:
            self.attention, self.matmul = "gqa", "nbits"
            self.lm_head = "int4" if int4_head else self.fast_key.lm_head
            if kv8:
                self.kv_cache = "int8"
                if lib and (attn == "edge" or mm):
                    so.register_custom_ops_library(str(lib))
                    self.attention = attn
                if mm:  # our pool does the parallel work; ORT's would spin against it
                    self.matmul = "edge"
                    native_ops.set_threads(lib, so.intra_op_num_threads)
                    so.intra_op_num_threads = 1
        self.variant = "fast" if fast else "bundle"
        self.llm = ort.InferenceSession(str(fast or root / "llm.onnx"), so, providers=provs)
        m = cfg.llm
        self._kv_shape = (1, m.num_kv_heads, 0, m.head_dim)
        self._past_names = [i.name for i in self.llm.get_inputs() if i.name.startswith("past_")]
        self._present_names = [o.name for o in self.llm.get_outputs() if o.name.startswith("present_")]
        # the bundle graph's cache dtype: float16 as export writes it by default, float32 with --kv-dtype fp32
        past_type = next(i.type for i in self.llm.get_inputs() if i.name in self._past_names)
        self._kv_np = np.float16 if past_type == "tensor(float16)" else np.float32
        self.reset()

    @staticmethod
    def _without_int8_gqa(root: Path, lib, attention: str, kv_cache: str, attn: str, kv8: bool):
        """(lib, attention, INT8 cache?) where GroupQueryAttention was to attend over the INT8
        cache: kept where this onnxruntime can, else our attention op, else the FP32 cache;
        asked-for settings that cannot be had are refused in one line."""
        from .op_choice import gqa_int8_unsupported

        why = gqa_int8_unsupported()
        if not why:
            return lib, attn, kv8
        if attention == "gqa":
            raise InputError(f"attention='gqa' over the INT8 KV cache: {why}; use attention='edge' or "
                             "kv_cache='fp32' (or onnxruntime 1.24+)")
        if lib is not None:  # any attention but an explicit gqa has tried to build our ops already
            log.info("%s: GroupQueryAttention cannot read the INT8 KV cache here (%s): our attention op", root, why)
            return lib, "edge", kv8
        if kv_cache == "int8":
            raise InputError(f"kv_cache='int8': {why}, and our attention op cannot be built here")
        log.warning("%s: FP32 KV cache (GroupQueryAttention cannot read the INT8 one here: %s; our attention op "
                    "cannot be built)", root, why)
        return lib, "gqa", False

    def reset(self) -> None:
        if self.variant == "fast":
            import onnxruntime as ort

            if not getattr(self, "past", None):  # allocated once, for the whole context
                dtype = np.int8 if self.kv_cache == "int8" else np.float32
                # each buffer as the graph declares it: [1, kv_heads, max_seq, head_dim], except the
                # edge attention op's keys, [1, kv_heads, key_blocks, head_dim, 64]
                sym = {"max_seq": self.max_context, "key_blocks": -(-self.max_context // 64)}
                shapes = {i.name: [d if isinstance(d, int) else sym[d] for d in i.shape]
                          for i in self.llm.get_inputs() if i.name in self._past_names}
                self.past = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shapes[n], dtype)) for n in self._past_names]
        else:
            empty = np.zeros(self._kv_shape, self._kv_np)
            self.past = [empty] * len(self._past_names)
        self.length = 0

    def cache_view(self, j: int) -> np.ndarray:
        """KV buffer j of the fast graph as [kv_heads, positions, head_dim], whatever its layout
        (the edge attention op keeps keys in blocks of 64 positions)."""
        a = self.past[j].numpy()[0]
        if a.ndim == 4:  # [kv_heads, blocks, head_dim, 64]
            a = a.transpose(0, 1, 3, 2).reshape(a.shape[0], -1, a.shape[2])
        return a

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        if self.vision is None:
            raise InputError(f"{self.cfg.root}: text-only bundle, it has no vision.onnx")
        return self.vision.run(None, {"pixels": np.ascontiguousarray(pixels, np.float32)})[0]

    def project(self, features: np.ndarray) -> np.ndarray:
        if self.projector is None:
            raise InputError(f"{self.cfg.root}: this bundle's vision.onnx projects its own features "
                             "(no projector.onnx: not a dynamic_s2 bundle)")
        return self.projector.run(None, {"image_features": np.ascontiguousarray(features, np.float32)})[0]

    def forward(self, embeds: np.ndarray, start: int) -> np.ndarray:
        n = embeds.shape[0]
        self._check_positions(start, n)
        if start < self.length and self.variant == "bundle":  # prefix reuse: rewind the cache to `start`
            self.past = [np.ascontiguousarray(p[:, :, :start]) if isinstance(p, np.ndarray)
                         else np.ascontiguousarray(p.numpy()[:, :, :start]) for p in self.past]
        if self.variant == "fast":
            return self._forward_fast(embeds, start)
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

    def _forward_fast(self, embeds: np.ndarray, start: int) -> np.ndarray:
        """GroupQueryAttention writes positions start.. into the shared buffers in place. One
        IO binding serves every step (the cache buffers and the logits buffer stay bound; only
        the three small inputs are rebound): rebinding ~50 buffers and allocating fresh logits
        each step cost a visible share of a decode step on the small models."""
        import onnxruntime as ort

        n = embeds.shape[0]
        if getattr(self, "_io", None) is None or self._io_past is not self.past:
            io = self.llm.io_binding()
            for pin, pout, buf in zip(self._past_names, self._present_names, self.past):
                io.bind_ortvalue_input(pin, buf)
                io.bind_ortvalue_output(pout, buf)
            vocab = self.llm.get_outputs()[0].shape[-1]
            self._logits_np = np.zeros((1, vocab), np.float32)  # the OrtValue wraps this memory
            self._logits = ort.OrtValue.ortvalue_from_numpy(self._logits_np)
            io.bind_ortvalue_output("logits", self._logits)
            self._io, self._io_past = io, self.past
        io = self._io
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds[None], np.float32))
        io.bind_cpu_input("seqlens_k", np.array([start + n - 1], np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(start + n, np.int32))
        self.llm.run_with_iobinding(io)
        self.length = start + n
        self.tokens_forwarded += n
        return self._logits_np[0].copy()  # the buffer is overwritten by the next step
