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

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        return self.embed_table[np.asarray(token_ids, np.int64)].astype(np.float32, copy=False)

    def _check_positions(self, start: int, n: int) -> None:
        if start + n > self.max_context:
            raise InputError(f"position {start + n - 1} beyond the context ({self.max_context})")
        if start > self.length:
            raise InputError(f"forward at {start} but the cache holds {self.length} positions")
