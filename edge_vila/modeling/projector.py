"""VILA's multimodal projectors (`mm_projector/`), with VILA's parameter names.

- linear:         Linear(C, H)
- mlp2x_gelu:     Linear(C, H), GELU, Linear(H, H)
- mlp_downsample (and mlp_downsample_2x2_fix, the same maths): 2x2 fold (zero-pad odd
  sides) -> LayerNorm(4C), Linear(4C, H), GELU, Linear(H, H)
- mlp_downsample_3x3_fix (NVILA): 3x3 fold (zero-pad to a multiple of 3) -> LayerNorm(9C),
  Linear(9C, 3C), GELU, LayerNorm(3C), Linear(3C, H), GELU, Linear(H, H)
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ProjectorSpec
from ..errors import CheckpointError


def fold(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N, L, C] with L a square grid -> [N, ceil(side/k)^2, k*k*C], output cells row-major.

    Output cell (a, b) concatenates the grid cells (ka+i, kb+j) for i, then j, in 0..k-1 —
    row by row within the k x k block, the channel layout VILA's DownSampleBlock (k=2) and
    DownSample3x3BlockFix (k=3) produce; the grid is first padded with zero rows and columns
    at its end up to a multiple of k.
    """
    n, length, c = x.shape
    side = math.isqrt(length)
    x = x.reshape(n, side, side, c)
    pad = -side % k
    if pad:
        x = F.pad(x, (0, 0, 0, pad, 0, pad))
    h = w = (side + pad) // k
    x = x.reshape(n, h, k, w, k, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h * w, k * k * c)


class DownSampleBlock(nn.Module):
    def __init__(self, k: int = 2):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fold(x, self.k)


class MultimodalProjector(nn.Module):
    def __init__(self, spec: ProjectorSpec):
        super().__init__()
        self.spec = spec
        c, h = spec.in_dim, spec.out_dim
        if spec.kind == "linear":
            self.layers = nn.Linear(c, h)
        elif spec.kind == "mlp2x_gelu":
            self.layers = nn.Sequential(nn.Linear(c, h), nn.GELU(), nn.Linear(h, h))
        elif spec.fold == 2:
            self.layers = nn.Sequential(DownSampleBlock(2), nn.LayerNorm(4 * c), nn.Linear(4 * c, h),
                                        nn.GELU(), nn.Linear(h, h))
        elif spec.fold == 3:
            self.layers = nn.Sequential(DownSampleBlock(3), nn.LayerNorm(9 * c), nn.Linear(9 * c, 3 * c), nn.GELU(),
                                        nn.LayerNorm(3 * c), nn.Linear(3 * c, h), nn.GELU(), nn.Linear(h, h))
        else:
            raise CheckpointError(f"unknown mm_projector_type {spec.kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def projector_config(spec: ProjectorSpec) -> dict:
    """mm_projector/config.json as VILA writes it."""
    return {"architectures": ["MultimodalProjector"], "model_type": "v2l_projector",
            "mm_projector_type": spec.kind}


def load_projector(folder: Path, spec: ProjectorSpec, dtype: torch.dtype = torch.float32) -> MultimodalProjector:
    from .llm import load_safetensors_dir

    proj = MultimodalProjector(spec)
    sd = load_safetensors_dir(folder)
    try:
        proj.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: projector weights do not match mm_projector_type "
                              f"{spec.kind} ({str(e).splitlines()[0]})") from None
    return proj.to(dtype).eval()
