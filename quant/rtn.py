"""Round-to-nearest group quantization of weight matrices (the AWQ baseline and the
final quantizer AWQ feeds). Weights are [out, in]; groups run along `in`. When `in` is
not a multiple of the group size (SmolLM2's 576 with g128) the last group is shorter:
zero padding never changes a group's range, because zero always lies inside it."""
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
        """The group size used for a layer with `in_features` inputs."""
        return self.group_size if self.group_size > 0 else in_features


def pad_to_groups(w: torch.Tensor, g: int) -> torch.Tensor:
    """Zero-pad the last dim to a multiple of g."""
    extra = (-w.shape[-1]) % g
    return torch.nn.functional.pad(w, (0, extra)) if extra else w


def quant_params(w: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and integer zero point for w [out, in] -> ([out, G], [out, G])."""
    g = cfg.groups(w.shape[1])
    wg = pad_to_groups(w.float(), g).reshape(w.shape[0], -1, g)
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
    wg = pad_to_groups(w.float(), g).reshape(w.shape[0], -1, g)
    q = (wg / scale[..., None]).round() + zero[..., None]
    q = q.clamp(0, cfg.qmax).to(torch.uint8).reshape(w.shape[0], -1)[:, : w.shape[1]]
    return q.contiguous(), scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    inp = q.shape[1]
    s = scale.repeat_interleave(group_size, dim=1)[:, :inp]
    z = zero.repeat_interleave(group_size, dim=1)[:, :inp]
    return (q.float() - z) * s


def fake_quant(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Quantize-dequantize in the weight's dtype (what the search scores)."""
    q, s, z = quantize(w, cfg)
    return dequantize(q, s, z, cfg.groups(w.shape[1])).to(w.dtype)
