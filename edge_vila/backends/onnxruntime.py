"""ONNX Runtime backend: runs the bundle's own ONNX files (the ones TensorRT compiles).

Providers are tried in order TensorRT EP (engine cache inside the bundle) -> CUDA EP ->
CPU. On the CPU the backend runs a private, faster graph derived from the bundle's
llm.onnx (ort_fast.py: MatMulNBits + attention over one preallocated KV buffer that decode
steps write in place; rewinds are free). Over the default INT8 cache, attention and the INT4
linears are our own custom ops (native_ops.py) when a C compiler can build them (the linear
only where it has its AVX-512 VNNI kernel), else GroupQueryAttention and MatMulNBits.
`variant="bundle"` runs the bundle's own graph instead: there each step's `present` outputs
are bound as the next step's `past` inputs (IO binding), so the host never copies the cache;
a rewind slices it once.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..bundle import BundleConfig
from ..errors import InputError
from . import BundleBackend

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

    def __init__(self, cfg: BundleConfig, max_context: int | None = None, threads: int | None = None,
                 providers: list[str] | None = None, exact: bool = False, variant: str = "auto",
                 kv_cache: str = "auto", attention: str = "auto", matmul: str = "auto"):
        import onnxruntime as ort
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
        provs = _providers(root, providers)
        if variant not in ("auto", "fast", "bundle"):
            raise InputError(f"variant {variant!r} unknown (expected auto, fast or bundle)")
        if kv_cache not in ("auto", "int8", "fp32"):
            raise InputError(f"kv_cache {kv_cache!r} unknown (expected auto, int8 or fp32)")
        if attention not in ("auto", "edge", "gqa"):
            raise InputError(f"attention {attention!r} unknown (expected auto, edge or gqa)")
        if matmul not in ("auto", "edge", "nbits"):
            raise InputError(f"matmul {matmul!r} unknown (expected auto, edge or nbits)")
        if matmul == "edge" and exact:
            raise InputError("matmul='edge' quantizes activations to int8 per block; exact=True keeps MatMulNBits")
        cpu_only = all((p if isinstance(p, str) else p[0]) == "CPUExecutionProvider" for p in provs)
        self.vision = self.projector = None
        if cfg.is_multimodal:
            vso = ort.SessionOptions()
            vso.intra_op_num_threads = so.intra_op_num_threads
            vso.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # S8 Q/DQ is what TensorRT wants but runs slowly on ORT's CPU kernels; unless asked for the
            # bundle graph as-is, let ORT rewrite it to U8 activations (its fast CPU path)
            if not cpu_only or exact or variant == "bundle":
                vso.add_session_config_entry("session.qdqisint8allowed", "1")
            self.vision = ort.InferenceSession(str(root / "vision.onnx"), vso, providers=provs)
            if "projector.onnx" in cfg.manifest["files"]:  # dynamic_s2: the projector runs after the host merge
                self.projector = ort.InferenceSession(str(root / "projector.onnx"), vso, providers=provs)
        self._load_embeddings(root)
        fast, level = None, 0 if exact else 4
        if variant == "fast" or (variant == "auto" and cpu_only and (cfg.manifest.get("quant") or {}).get("llm") == "awq-w4"):
            fast = _fast_graph(cfg, accuracy_level=level, required=variant == "fast")
        if kv_cache == "int8" and not fast:
            raise InputError(f"{root}: an INT8 KV cache needs the fast CPU graph (INT4 bundle, CPU provider)")
        self.kv_cache, self.attention, self.matmul = "fp32", "gqa" if fast else None, "nbits" if fast else None
        if fast and (kv_cache == "int8" or (kv_cache == "auto" and not exact)):
            fp32_graph = fast
            lib, mm = None, False
            if attention != "gqa" or (matmul != "nbits" and not exact):  # our ops (native_ops.py)
                from . import native_ops
                explicit = "edge" in (attention, matmul)
                try:
                    lib = native_ops.build_library() if explicit else native_ops.try_build_library()
                except (RuntimeError, OSError) as e:  # asked for explicitly: say why it cannot be had
                    raise InputError(f"{'attention' if attention == 'edge' else 'matmul'}='edge': {e}") from None
                # without AVX-512 VNNI our linear runs portable loops; MatMulNBits is faster there
                mm = bool(lib) and not exact and (
                    matmul == "edge" or (matmul == "auto" and native_ops.int4_linear_native(lib)))
            attn = "edge" if lib and attention != "gqa" else "gqa"
            kv8 = _fast_graph(cfg, accuracy_level=level, required=kv_cache == "int8",
                              kv_scales=lambda: self._calibrate_kv(fp32_graph, so),
                              attention=attn, matmul="edge" if mm else "nbits")
            if kv8:
                fast, self.kv_cache = kv8, "int8"
                if lib and (attn == "edge" or mm):
                    so.register_custom_ops_library(str(lib))
                    self.attention = attn
                if mm:  # our pool does the parallel work; ORT's would spin against it
                    self.matmul = "edge"
                    native_ops.set_threads(lib, so.intra_op_num_threads)
                    so.intra_op_num_threads = 1
        elif "edge" in (attention, matmul):
            raise InputError(f"{root}: the edge ops need the INT8 KV cache of the fast CPU graph")
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

    def _calibrate_kv(self, fp32_graph: Path, so) -> np.ndarray:
        """INT8 KV scales, from the FP32-cache fast graph run on the bundle's own embeddings."""
        import onnxruntime as ort

        from .ort_fast import calibrate_kv_scales

        m = self.cfg.llm
        ref = ort.InferenceSession(str(fp32_graph), so, providers=["CPUExecutionProvider"])
        return calibrate_kv_scales(ref, self._kv_calibration_sequences(), m.num_layers, m.num_kv_heads, m.head_dim)

    def _kv_calibration_sequences(self) -> list[np.ndarray]:
        """Prompts the way the runtime sends them: chat-formatted text and, for a VLM, image
        embeddings from vision.onnx (synthetic scenes and a photo-like gradient) inside them."""
        from ..prompt import TextTokenizer
        from .ort_fast import KV_CALIBRATION_TEXT

        tok = TextTokenizer(self.cfg.root)
        img = None
        if self.vision is not None:
            from PIL import Image

            from ..preprocess import preprocess_images
            from ..synthetic import world

            pre = self.cfg.preprocess
            side = max(pre.height, pre.width)
            pics = [world.random_scene(world.rng_for(5, i)).render(side) for i in range(3)]
            yy, xx = np.mgrid[0:side, 0:side] / max(side - 1, 1)
            pics.append(Image.fromarray((np.stack([xx, yy, 1 - xx * yy], -1) * 255).astype(np.uint8)))
            img = self.encode_untiled(preprocess_images(pics, pre))  # [n_images, tokens, hidden]
        seqs = []
        for j, text in enumerate(KV_CALIBRATION_TEXT):
            ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text)
            emb = self.embed(np.asarray(ids[: self.max_context // 2]))
            if img is not None:
                emb = np.concatenate([emb[:1], img[j % len(img)], emb[1:]])
            seqs.append(emb[: self.max_context])
        return seqs

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


def _fast_graph(cfg: BundleConfig, accuracy_level: int, required: bool,
                kv_scales: Callable[[], np.ndarray] | None = None, attention: str = "gqa",
                matmul: str = "nbits") -> Path | None:
    """The cached fast CPU graph for this bundle (built on first use); None if unavailable.
    With `kv_scales` (called only when the graph must be built) its KV cache is INT8; that
    graph is cached as `<sha>-acc<level>-kv8` (`-edgeattn` with our attention op, `-edgemm`
    with our INT4 linear op), keyed by llm.onnx's and llm.onnx.data's hashes like the FP32 one."""
    try:
        from .ort_fast import build_fast_llm
    except ImportError as e:  # the onnx package is needed to build it
        if required:
            raise InputError(f"the fast CPU graph needs the onnx package ({e})") from None
        return None
    files = cfg.manifest["files"]  # the graph and its weights file: one without the other says little
    digest = hashlib.sha256((files["llm.onnx"] + files.get("llm.onnx.data", "")).encode()).hexdigest()[:16]
    name = f"{digest}-acc{accuracy_level}" + ("-kv8" if kv_scales else "") + ("-edgeattn" if attention == "edge" else "") + (
        "-edgemm" if matmul == "edge" else "")
    candidates = [cfg.root / "engines" / "ort-cpu" / name,
                  Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-vila" / "ort-cpu" / name]
    for folder in candidates:
        path = folder / "llm_fast.onnx"
        if path.is_file() and (folder / "llm_fast.onnx.data").is_file():
            return path
    scales = kv_scales() if kv_scales else None
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return build_fast_llm(cfg.root / "llm.onnx", cfg.manifest, folder / "llm_fast.onnx", accuracy_level,
                                  kv_scales=scales, attention=attention, matmul=matmul)
        except PermissionError:
            continue
        except (ValueError, KeyError) as e:  # a graph this builder does not know: run the bundle's own
            if required:
                raise InputError(f"{cfg.root}: cannot build the fast CPU graph ({e})") from None
            log.warning("%s: running the bundle graph (fast CPU graph unavailable: %s)", cfg.root, e)
            return None
    return None
