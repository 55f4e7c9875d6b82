"""Tensor-at-a-time access to an LLM folder's safetensors (memory-mapped), so quantize,
export and the torch reference never hold a second whole-model copy: a 3B checkpoint in
bf16 is 5.5 GB on disk and would be 11 GB as one float32 state dict.

`CheckpointWeights` answers by parameter name (transformers' names): float tensors in
their stored dtype or as float32, and, for AutoAWQ GEMM linears, the integer codes,
scales and zero points (edge_vila.quantfmt's layout)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..config import weight_files
from ..errors import CheckpointError

AWQ_PARTS = (".qweight", ".qzeros", ".scales")


class CheckpointWeights:
    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        files = weight_files(self.folder)
        if not files:
            raise CheckpointError(f"{self.folder}: no *.safetensors weights found")
        self._files = {f: safe_open(str(f), framework="pt") for f in files}
        self._where: dict[str, object] = {}
        for f, h in self._files.items():
            for k in h.keys():
                self._where[k] = h
        self.names = list(self._where)
        # export asks for the codes, scales and zero correction of one linear in turn
        self.int4 = lru_cache(maxsize=4)(self._int4)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor (its own dtype); only this tensor is read from disk."""
        h = self._where.get(name)
        if h is None:
            raise CheckpointError(f"{self.folder}: tensor {name!r} not found in its safetensors")
        return h.get_tensor(name)

    def float32(self, name: str) -> np.ndarray:
        return self.get(name).float().numpy()

    def shape(self, name: str) -> tuple[int, ...]:
        h = self._where[name]
        return tuple(h.get_slice(name).get_shape())

    def is_int4(self, base: str) -> bool:
        """Whether linear `base` (e.g. 'model.layers.0.mlp.up_proj') is stored as AutoAWQ GEMM."""
        return base + ".qweight" in self._where

    def _int4(self, base: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (codes [out, in] uint8 0..15, scales [out, G] float32, zeros [out, G] uint8)."""
        from ..quantfmt import unpack_linear

        return unpack_linear(self.get(base + ".qweight").numpy(), self.get(base + ".qzeros").numpy(),
                             self.get(base + ".scales").float().numpy())

    def float_names(self) -> list[str]:
        """Every tensor that is not part of a packed linear."""
        return [n for n in self.names if not n.endswith(AWQ_PARTS)]

    def int4_bases(self) -> list[str]:
        return [n[: -len(".qweight")] for n in self.names if n.endswith(".qweight")]
