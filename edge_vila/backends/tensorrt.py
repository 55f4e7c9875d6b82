"""TensorRT backend: runs engines built on the device by `edge-vila build`.

Same interface as the ONNX Runtime and torch backends, so the generation code above is
shared. Embeddings are looked up on the host (embed.safetensors); the engines take
`inputs_embeds` + `position_ids` + past K/V and return last-position logits + present K/V.

Memory: every buffer is allocated once at load for the max context. The bundle's LLM
returns the whole cache as `present` (standard ONNX attention, so one file serves
TensorRT and ONNX Runtime), so two KV buffer sets ping-pong: step t reads set A as
`past` and writes set B as `present`; step t+1 the reverse. No host copies, no
re-allocation; a rewind for prefix reuse just sets a shorter past length.
Profiles: 0 = prefill (many tokens), 1 = decode (one token), switched on the same
execution context. CUDA graphs (cuda-python only): the decode step is captured per
(past length, buffer parity) and replayed when that position recurs — the case of a
camera loop, which re-asks the same prompt at the same positions frame after frame.

Status: written against TensorRT 10's Python API; no TensorRT/GPU exists where this
repository is developed, so everything below `__init__` is unverified on hardware
(run `pytest -m gpu` on a Jetson). The engine-key checks it relies on are tested on CPU.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np

from ..bundle import BundleConfig
from ..errors import InputError
from . import BundleBackend

log = logging.getLogger(__name__)
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32}


class TensorRTBackend(BundleBackend):
    name = "tensorrt"

    def __init__(self, cfg: BundleConfig, max_context: int | None = None, cuda_graphs: bool = True,
                 runtime: str = "auto", max_graphs: int = 512):
        try:
            import tensorrt as trt
        except ImportError as e:
            raise InputError(f"TensorRT is not importable here ({e}); on Jetson create the venv with "
                             "--system-site-packages (jetson/setup.sh)") from None
        from ..jetson.detect import detect
        from ..jetson.engines import EngineKey, LLM_PLAN, PROJECTOR_PLAN, VISION_PLAN, select_engines, vision_batch
        from .cuda_mem import device_sm, open_runtime

        self.trt = trt
        self.cfg = cfg
        info = detect()
        self.cuda = open_runtime(runtime)
        sm = info.sm or device_sm()
        here = EngineKey(tensorrt=trt.__version__, sm=sm, jetpack=info.jetpack,
                         onnx_sha256={k: v for k, v in cfg.manifest.files.items() if k.endswith((".onnx", ".onnx.data"))})
        folder, built = select_engines(cfg.root, here)
        self.max_context = min(max_context or built.max_context, built.max_context)
        self.max_prefill = built.max_prefill
        self.hidden_size = cfg.llm.hidden_size
        self.tokens_forwarded = 0
        self._load_embeddings(cfg.root)
        rt = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.llm = rt.deserialize_cuda_engine((folder / LLM_PLAN).read_bytes())
        self.ctx = self.llm.create_execution_context()
        io = cfg.manifest.io["llm"]
        self._in, self._out = io["inputs"], io["outputs"]
        m = cfg.llm
        D, V = m.hidden_size, m.vocab_size
        kv_elem = 2 if io.get("kv_dtype", "float32") == "float16" else 4  # the engine's KV I/O as exported
        kv_bytes = m.num_kv_heads * self.max_context * m.head_dim * kv_elem
        self._kv = [[self.cuda.alloc(kv_bytes) for _ in range(2 * m.num_layers)] for _ in range(2)]
        self._embeds = self.cuda.alloc(self.max_prefill * D * 4)
        self._pos = self.cuda.alloc(self.max_prefill * 8)
        self._logits = self.cuda.alloc(V * 4)
        self._logits_host = np.empty(V, np.float32)
        self._kv_dims = (m.num_kv_heads, m.head_dim)
        self.cur = 0  # which KV set holds the cache
        self.length = 0
        self.profile = -1
        self.use_graphs = cuda_graphs and self.cuda.graphs
        self._graphs: OrderedDict = OrderedDict()
        self._seen: set = set()
        self._max_graphs = max_graphs
        self.vision = self.projector = None
        if cfg.is_multimodal:
            self.vision = rt.deserialize_cuda_engine((folder / VISION_PLAN).read_bytes())
            self.vctx = self.vision.create_execution_context()
            self.max_images = vision_batch(cfg.manifest, built.max_images)  # the profile's largest batch
            pre = cfg.preprocess
            self._pix_shape = (3, pre.height, pre.width)
            self._pix = self.cuda.alloc(self.max_images * int(np.prod(self._pix_shape)) * 4)
            vio = cfg.manifest.io["vision"]
            self._vout = vio["outputs"][0]
            if pre.s2:  # vision engine: ViT features per tile; the projector engine runs after the host merge
                v = cfg.manifest.vision_dims
                self._vout_shape = (v["patches"], v["hidden_size"])
                self.projector = rt.deserialize_cuda_engine((folder / PROJECTOR_PLAN).read_bytes())
                self.pctx = self.projector.create_execution_context()
                self.max_blocks = built.max_images * pre.max_tiles
                self._feat = self.cuda.alloc(self.max_blocks * v["patches"] * v["projector_channels"] * 4)
                self._proj = self.cuda.alloc(self.max_blocks * cfg.tokens_per_image * D * 4)
            else:
                self._vout_shape = (cfg.tokens_per_image, D)
            self._img = self.cuda.alloc(self.max_images * int(np.prod(self._vout_shape)) * 4)

    # -- interface -------------------------------------------------------------------
    def reset(self) -> None:
        self.length = 0

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        if self.vision is None:
            raise InputError(f"{self.cfg.root}: text-only bundle, it has no vision engine")
        return self._run_batched(self.vctx, "vision", ("pixels", self._pix), (self._vout, self._img), pixels,
                                 self.max_images, self._vout_shape)

    def project(self, features: np.ndarray) -> np.ndarray:
        """dynamic_s2: blocks of merged features -> tokens, on the projector engine."""
        if self.projector is None:
            raise InputError(f"{self.cfg.root}: not a dynamic_s2 bundle (no projector engine)")
        return self._run_batched(self.pctx, "projector", ("image_features", self._feat), ("image_embeds", self._proj),
                                 features, self.max_blocks, (self.cfg.tokens_per_image, self.hidden_size))

    def _run_batched(self, ctx, what: str, inp: tuple, out: tuple, x: np.ndarray, most: int,
                     row_shape: tuple) -> np.ndarray:
        """One input -> one output engine call per chunk of at most `most` rows (the profile's cap)."""
        (in_name, in_buf), (out_name, out_buf) = inp, out
        res = []
        for i in range(0, len(x), most):
            chunk = np.ascontiguousarray(x[i:i + most], np.float32)
            ctx.set_input_shape(in_name, chunk.shape)
            ctx.set_tensor_address(in_name, in_buf)
            ctx.set_tensor_address(out_name, out_buf)
            self.cuda.h2d(in_buf, chunk)
            if not ctx.execute_async_v3(self.cuda.stream_handle):
                raise RuntimeError(f"TensorRT {what} engine failed to enqueue")
            host = np.empty((len(chunk), *row_shape), np.float32)
            self.cuda.d2h(host, out_buf)
            self.cuda.sync()
            res.append(host)
        return np.concatenate(res)

    def forward(self, embeds: np.ndarray, start: int) -> np.ndarray:
        n = embeds.shape[0]
        self._check_positions(start, n)
        if n > self.max_prefill:  # longer prompts go through in engine-sized chunks
            for i in range(0, n, self.max_prefill):
                logits = self.forward(embeds[i:i + self.max_prefill], start + i)
            return logits
        profile = 1 if (n == 1 and start > 0) else 0
        if profile != self.profile:
            self.ctx.set_optimization_profile_async(profile, self.cuda.stream_handle)
            self.profile = profile
        self._bind(n, start)
        self.cuda.h2d(self._embeds, np.ascontiguousarray(embeds, np.float32))
        self.cuda.h2d(self._pos, np.arange(start, start + n, dtype=np.int64))
        self._execute(profile, n, start)
        self.cuda.d2h(self._logits_host, self._logits)
        self.cuda.sync()
        self.cur ^= 1
        self.length = start + n
        self.tokens_forwarded += n
        return self._logits_host.copy()

    # -- internals -------------------------------------------------------------------
    def _bind(self, n: int, start: int) -> None:
        kvh, hd = self._kv_dims
        c = self.ctx
        c.set_input_shape(self._in[0], (1, n, self.hidden_size))
        c.set_input_shape(self._in[1], (n,))
        c.set_tensor_address(self._in[0], self._embeds)
        c.set_tensor_address(self._in[1], self._pos)
        c.set_tensor_address(self._out[0], self._logits)
        for i, (pin, pout) in enumerate(zip(self._in[2:], self._out[1:])):
            c.set_input_shape(pin, (1, kvh, start, hd))
            c.set_tensor_address(pin, self._kv[self.cur][i])
            c.set_tensor_address(pout, self._kv[self.cur ^ 1][i])

    def _execute(self, profile: int, n: int, start: int) -> None:
        key = (start, self.cur)
        if self.use_graphs and profile == 1:
            g = self._graphs.get(key)
            if g is not None:
                self._graphs.move_to_end(key)
                self.cuda.launch(g)
                return
            if key in self._seen:  # second visit: TensorRT has done its first-run setup; capture now
                self.cuda.begin_capture()
                self.ctx.execute_async_v3(self.cuda.stream_handle)
                self._graphs[key] = self.cuda.end_capture()
                if len(self._graphs) > self._max_graphs:
                    self._graphs.popitem(last=False)
                self.cuda.launch(self._graphs[key])
                return
            self._seen.add(key)
        if not self.ctx.execute_async_v3(self.cuda.stream_handle):
            raise RuntimeError("TensorRT LLM engine failed to enqueue")


__all__ = ["TensorRTBackend"]
