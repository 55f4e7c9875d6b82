"""Runtimes behind one small interface (see `edge_vila.generate.Backend`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError


class BundleBackend:
    """What every bundle backend shares: the host-side embedding table and position checks."""
    max_context: int
    length: int

    def _load_embeddings(self, root: Path) -> None:
        from safetensors.numpy import load_file

        self.embed_table = load_file(str(root / "embed.safetensors"))["embed_tokens"]

    def encode_untiled(self, pixels: np.ndarray) -> np.ndarray:
        """Images of one vision input each -> their tokens [N, T, D]; a dynamic_s2 bundle's
        ViT features are repeated across the scales, then projected (edge_vila.s2)."""
        out = self.encode_images(pixels)
        pre = self.cfg.preprocess
        if pre is not None and pre.s2:
            from ..s2 import untiled_inputs

            out = self.project(untiled_inputs(out, len(pre.s2_scales)))
        return out

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        return self.embed_table[np.asarray(token_ids, np.int64)].astype(np.float32, copy=False)

    def _check_positions(self, start: int, n: int) -> None:
        if start + n > self.max_context:
            raise InputError(f"position {start + n - 1} beyond the context ({self.max_context})")
        if start > self.length:
            raise InputError(f"forward at {start} but the cache holds {self.length} positions")
