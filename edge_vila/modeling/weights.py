"""Tensor-at-a-time access to an LLM folder's safetensors (one read per tensor), so quantize,
export and the torch reference never hold a second whole-model copy: a 3B checkpoint in
bf16 is 5.5 GB on disk and would be 11 GB as one float32 state dict.

`CheckpointWeights` answers by parameter name (transformers' names): float tensors in
their stored dtype or as float32, and, for AutoAWQ GEMM linears, the integer codes,
scales and zero points (edge_vila.quantfmt's layout)."""
from __future__ import annotations

import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..config import safetensors_header, weight_files
from ..errors import CheckpointError

AWQ_PARTS = (".qweight", ".qzeros", ".scales")


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
           "BOOL": torch.bool}


class CheckpointWeights:
    """Reads each tensor with one positioned read from its shard: no memory map, so the
    pages of tensors already used do not stay resident (a memory-mapped 5.5 GB checkpoint
    read end to end counts 5.5 GB in the process's RSS until it is closed)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        files = weight_files(self.folder)
        if not files:
            raise CheckpointError(f"{self.folder}: no *.safetensors weights found")
        self._where: dict[str, tuple[Path, int, str, tuple[int, ...], int]] = {}
        for f in files:
            data_start, header = safetensors_header(f)
            size = f.stat().st_size
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                start, end = v["data_offsets"]
                if v["dtype"] not in _DTYPES or data_start + end > size:
                    raise CheckpointError(f"{f}: tensor {k!r} ({v['dtype']}, bytes {start}-{end}) "
                                          f"is not readable (unknown dtype or file truncated)")
                self._where[k] = (f, data_start + start, v["dtype"], tuple(v["shape"]), end - start)
        self.names = list(self._where)
        # export asks for the codes, scales and zero correction of one linear in turn
        self.int4 = lru_cache(maxsize=4)(self._int4)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor (its own dtype); only this tensor is read from disk."""
        loc = self._where.get(name)
        if loc is None:
            raise CheckpointError(f"{self.folder}: tensor {name!r} not found in its safetensors")
        f, off, dtype, shape, nbytes = loc
        buf = bytearray(nbytes)
        with open(f, "rb") as fh:
            fh.seek(off)
            if fh.readinto(buf) != nbytes:
                raise CheckpointError(f"{f}: truncated while reading {name!r}")
        if nbytes == 0:
            return torch.empty(shape, dtype=_DTYPES[dtype])
        return torch.frombuffer(buf, dtype=_DTYPES[dtype]).reshape(shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name][3]

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype, from the header (no tensor bytes read)."""
        if name not in self._where:
            raise CheckpointError(f"{self.folder}: tensor {name!r} not found in its safetensors")
        return _DTYPES[self._where[name][2]]

    def head_name(self, tied: bool) -> str:
        """The LM head's tensor: lm_head.weight, or the embedding table for a tied head saved without one."""
        return "model.embed_tokens.weight" if tied and "lm_head.weight" not in self._where else "lm_head.weight"

    def float32(self, name: str) -> np.ndarray:
        return self.get(name).float().numpy()

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


_NAMES = {v: k for k, v in _DTYPES.items()}
_NP_NAMES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
             np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.int16): "I16",
             np.dtype(np.int32): "I32", np.dtype(np.int64): "I64", np.dtype(np.bool_): "BOOL"}


class SafetensorsWriter:
    """Writes one safetensors file a tensor at a time, so a shard of several GB never sits in
    memory (safetensors' save_file takes a dict of every tensor and serializes them into one
    buffer first: twice the shard's size). Tensor bytes go to a scratch file as they arrive;
    `close()` writes the header (8-byte length, JSON padded to 8 bytes, as safetensors
    writes it) and copies the data behind it, then renames into place."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._scratch = self.path.with_name(f".{self.path.name}.data.tmp")
        self._fh = open(self._scratch, "wb")
        self._header: dict[str, dict] = {}
        self.nbytes = 0

    def add(self, name: str, t: torch.Tensor | np.ndarray) -> None:
        if name in self._header:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        if isinstance(t, np.ndarray):
            dtype, shape = _NP_NAMES[t.dtype], list(t.shape)
            raw = np.ascontiguousarray(t).reshape(-1).view(np.uint8)
        else:
            dtype, shape = _NAMES[t.dtype], list(t.shape)
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._fh.write(memoryview(raw))
        self._header[name] = {"dtype": dtype, "shape": shape,
                              "data_offsets": [self.nbytes, self.nbytes + raw.nbytes]}
        self.nbytes += raw.nbytes

    def close(self) -> Path:
        self._fh.close()
        header = dict(self._header)
        if self.metadata:
            header["__metadata__"] = self.metadata
        js = json.dumps(header, separators=(",", ":")).encode()
        js += b" " * (-len(js) % 8)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with open(tmp, "wb") as out, open(self._scratch, "rb") as src:
                out.write(len(js).to_bytes(8, "little"))
                out.write(js)
                shutil.copyfileobj(src, out, 16 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        finally:
            for p in (tmp, self._scratch):
                p.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        self._fh.close()
        self._scratch.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
