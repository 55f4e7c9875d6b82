"""VILA's multimodal projectors (`mm_projector/`), with VILA's parameter names.

- linear:         Linear(C, H)
- mlp2x_gelu:     Linear(C, H), GELU, Linear(H, H)
- mlp_downsample: 2x2 fold (zero-pad odd sides) -> LayerNorm(4C), Linear(4C, H), GELU, Linear(H, H)
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ProjectorSpec
from ..errors import CheckpointError


def fold_2x2(x: torch.Tensor) -> torch.Tensor:
    """[N, L, C] with L a square grid -> [N, ceil(h/2)*ceil(w/2), 4C].

    Output cell (a, b) concatenates the grid cells (2a,2b), (2a,2b+1), (2a+1,2b),
    (2a+1,2b+1) in that order, the channel layout VILA's DownSampleBlock produces;
    odd sides are padded with zeros first.
    """
    n, length, c = x.shape
    side = math.isqrt(length)
    x = x.reshape(n, side, side, c)
    if side % 2:
        x = F.pad(x, (0, 0, 0, 1, 0, 1))
    h, w = x.shape[1] // 2, x.shape[2] // 2
    x = x.reshape(n, h, 2, w, 2, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h * w, 4 * c)


class DownSampleBlock(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fold_2x2(x)


class MultimodalProjector(nn.Module):
    def __init__(self, spec: ProjectorSpec):
        super().__init__()
        self.spec = spec
        c, h = spec.in_dim, spec.out_dim
        if spec.kind == "linear":
            self.layers = nn.Linear(c, h)
        elif spec.kind == "mlp2x_gelu":
            self.layers = nn.Sequential(nn.Linear(c, h), nn.GELU(), nn.Linear(h, h))
        elif spec.kind == "mlp_downsample":
            self.layers = nn.Sequential(DownSampleBlock(), nn.LayerNorm(4 * c), nn.Linear(4 * c, h),
                                        nn.GELU(), nn.Linear(h, h))
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
