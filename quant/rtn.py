"""Round-to-nearest group quantization of weight matrices (the AWQ baseline and the
final quantizer AWQ feeds). Weights are [out, in]; groups run along `in`."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantConfig:
    w_bit: int = 4
    group_size: int = 128
    zero_point: bool = True  # asymmetric (AWQ's default); False = symmetric

    @property
    def qmax(self) -> int:
        return 2 ** self.w_bit - 1

    def groups(self, in_features: int) -> int:
        g = self.group_size if self.group_size > 0 else in_features
        if in_features % g:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {g}")
        return g


def quant_params(w: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and integer zero point for w [out, in] -> ([out, G], [out, G])."""
    g = cfg.groups(w.shape[1])
    wg = w.float().reshape(w.shape[0], -1, g)
    if cfg.zero_point:
        lo = wg.amin(-1).clamp(max=0)
        hi = wg.amax(-1).clamp(min=0)
        scale = ((hi - lo).clamp(min=1e-5) / cfg.qmax)
        zero = (-lo / scale).round().clamp(0, cfg.qmax)
    else:
        half = 2 ** (cfg.w_bit - 1)
        scale = wg.abs().amax(-1).clamp(min=1e-5) / (half - 1)
        zero = torch.full_like(scale, float(half))  # symmetric as unsigned with a fixed zero of 8
    return scale, zero


def quantize(w: torch.Tensor, cfg: QuantConfig, scale: torch.Tensor | None = None,
             zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (q uint8 [out, in] in 0..qmax, scale [out, G], zero [out, G])."""
    if scale is None or zero is None:
        scale, zero = quant_params(w, cfg)
    g = cfg.groups(w.shape[1])
    wg = w.float().reshape(w.shape[0], -1, g)
    q = (wg / scale[..., None]).round() + zero[..., None]
    return q.clamp(0, cfg.qmax).to(torch.uint8).reshape(w.shape), scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    out, inp = q.shape
    qg = q.float().reshape(out, -1, group_size)
    return ((qg - zero[..., None]) * scale[..., None]).reshape(out, inp)


def fake_quant(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Quantize-dequantize in the weight's dtype (what the search scores)."""
    q, s, z = quantize(w, cfg)
    return dequantize(q, s, z, cfg.groups(w.shape[1])).to(w.dtype)
