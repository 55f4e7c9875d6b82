"""Where quantization's heavy work runs: CUDA when there is a GPU (or when asked), the CPU
otherwise. The work moves one decoder layer (or the vision tower) to the device at a time;
weights are read and packed on the host, so device memory holds one layer plus the
calibration activations, never the model."""
from __future__ import annotations

import torch

from edge_vila.errors import InputError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | None = "auto") -> torch.device:
    """'auto' -> cuda:0 when torch sees a GPU, else cpu; 'cuda' / 'cuda:N' without one is an error."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: torch sees no CUDA device here (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu or auto")
        return torch.device(name)
    raise InputError(f"--device {name!r} unknown (expected {', '.join(DEVICES)} or cuda:N)")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"
