"""AutoAWQ's GEMM packing (the on-disk format of our quantized LLMs), in numpy so the
runtime can read it without torch.

For a linear with weight [out, in] quantized to 4-bit codes q (0..15), group size g:
  qweight int32 [in, out/8]   eight output columns per int32; nibble i (bits 4i..4i+3)
                              holds column 8c + ORDER[i], ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
  qzeros  int32 [in/g, out/8] zero points, packed the same way
  scales  fp16  [in/g, out]     (ceil(in/g) groups: the last may be shorter)
  w[o, i] = (q[o, i] - z[o, i // g]) * s[o, i // g]
"""
from __future__ import annotations

import numpy as np

AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])
SHIFTS = np.arange(0, 32, 4, dtype=np.uint32)


def pack_cols(codes: np.ndarray) -> np.ndarray:
    """[rows, cols] uint8 codes (cols % 8 == 0) -> int32 [rows, cols/8] in AWQ nibble order."""
    rows, cols = codes.shape
    if cols % 8:
        raise ValueError(f"AWQ packing needs a multiple of 8 columns, got {cols}")
    c = codes.astype(np.uint32).reshape(rows, cols // 8, 8)[:, :, AWQ_ORDER]
    return (c << SHIFTS).sum(axis=-1, dtype=np.uint32).view(np.int32)


def unpack_cols(packed: np.ndarray) -> np.ndarray:
    """Inverse of pack_cols -> uint8 [rows, cols]."""
    p = packed.view(np.uint32)[..., None]
    nib = ((p >> SHIFTS) & 0xF).astype(np.uint8)  # nibble i holds column ORDER[i]
    out = np.empty_like(nib)
    out[..., AWQ_ORDER] = nib
    return out.reshape(packed.shape[0], -1)


def pack_linear(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> dict[str, np.ndarray]:
    """q [out, in], scales/zeros [out, G] -> AutoAWQ GEMM tensors."""
    return {"qweight": pack_cols(np.ascontiguousarray(q.T)),
            "qzeros": pack_cols(np.ascontiguousarray(zeros.astype(np.uint8).T)),
            "scales": np.ascontiguousarray(scales.T).astype(np.float16)}


def unpack_linear(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AutoAWQ GEMM tensors -> (q [out, in] uint8, scales [out, G] float32, zeros [out, G] uint8)."""
    q = unpack_cols(qweight).T
    z = unpack_cols(qzeros).T
    return np.ascontiguousarray(q), np.ascontiguousarray(scales.T.astype(np.float32)), np.ascontiguousarray(z)


def dequantize_linear(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray,
                      group_size: int | None = None) -> np.ndarray:
    """Float weight [out, in]. The last group may be shorter than group_size (in % g != 0)."""
    q, s, z = unpack_linear(qweight, qzeros, scales)
    n_in, G = q.shape[1], s.shape[1]
    g = group_size or -(-n_in // G)
    idx = np.arange(n_in) // g
    return (q.astype(np.float32) - z[:, idx]) * s[:, idx]
