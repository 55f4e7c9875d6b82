"""INT8 fake quantization of the vision tower + projector from a calibration table
(TensorRT's explicit-quantization convention: per-channel symmetric INT8 weights,
per-tensor symmetric INT8 activations at every Linear / Conv input). The torch
reference of a quantized checkpoint uses it; `edge_vila.quant.int8` calibrates."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

QMAX = 127
INT8_FILE = "vision_int8.safetensors"


@dataclass
class Int8Calibration:
    method: str
    act_scale: dict[str, float] = field(default_factory=dict)  # module name -> per-tensor input scale
    weight_scale: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> [out] scales

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{k}.input_scale": torch.tensor([v], dtype=torch.float32) for k, v in self.act_scale.items()}
        out.update({f"{k}.weight_scale": v.float() for k, v in self.weight_scale.items()})
        return out

    @classmethod
    def from_tensors(cls, method: str, t: dict[str, torch.Tensor]) -> "Int8Calibration":
        c = cls(method)
        for k, v in t.items():
            if k.endswith(".input_scale"):
                c.act_scale[k[: -len(".input_scale")]] = float(v[0])
            elif k.endswith(".weight_scale"):
                c.weight_scale[k[: -len(".weight_scale")]] = v
        return c


def quantizable(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


@torch.no_grad()
def _fq(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    return (x / scale).round().clamp(-QMAX - 1, QMAX) * scale


@torch.no_grad()
def fake_quant_vision(model: nn.Module, cal: Int8Calibration) -> list:
    """Apply INT8 Q/DQ to weights (in place) and inputs (hooks); returns the hook handles."""
    handles = []
    for n, m in quantizable(model).items():
        if n not in cal.act_scale:
            continue
        ws = cal.weight_scale[n].to(m.weight.device, m.weight.dtype).reshape(-1, *([1] * (m.weight.dim() - 1)))
        m.weight.data = _fq(m.weight.data, ws)
        s = cal.act_scale[n]
        handles.append(m.register_forward_pre_hook(lambda mod, inp, s=s: (_fq(inp[0], s),) + tuple(inp[1:])))
    return handles



def load_int8(path: Path) -> Int8Calibration:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        method = (f.metadata() or {}).get("method", "unknown")
    return Int8Calibration.from_tensors(method, load_file(str(path)))
