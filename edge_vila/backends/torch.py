"""Torch reference backend: the float model every other backend is checked against."""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..config import VilaConfig
from ..modeling.vlm import VLM

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchBackend:
    name = "torch"

    def __init__(self, cfg: VilaConfig, max_context: int, dtype: str = "float32", threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.dtype = DTYPES[dtype]
        self.vlm = VLM.load(cfg, self.dtype)
        self.max_context = max_context
        self.hidden_size = cfg.llm.hidden_size
        self.vlm.llm.setup_cache(max_context)
        self.tokens_forwarded = 0

    @torch.inference_mode()
    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(token_ids, np.int64))
        return self.vlm.llm.model.embed_tokens(ids).float().numpy()

    @torch.inference_mode()
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(pixels, np.float32)).to(self.dtype)
        return self.vlm.encode_images(x).float().numpy()

    @torch.inference_mode()
    def project(self, features: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(features, np.float32)).to(self.dtype)
        return self.vlm.project(x).float().numpy()

    @torch.inference_mode()
    def forward(self, embeds: np.ndarray, start: int) -> np.ndarray:
        n = embeds.shape[0]
        x = torch.from_numpy(np.ascontiguousarray(embeds, np.float32)).to(self.dtype)[None]
        pos = torch.arange(start, start + n)
        logits = self.vlm.llm(x, pos, last_only=True)
        self.tokens_forwarded += n
        return logits[0, -1].float().numpy()
