"""edge-vila: VILA-family vision-language models on NVIDIA Jetson Orin (and any CPU).

Importing this package pulls in neither torch nor transformers: the device runtime
needs only numpy, pillow, tokenizers and (for bundles) onnxruntime.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import CheckpointError, ContextOverflowError, EdgeVilaError, InputError  # noqa: E402
from .generate import SamplingParams  # noqa: E402
from .options import RuntimeOptions  # noqa: E402


def load(*args, **kwargs):
    """See `edge_vila.api.load`."""
    from .api import load as _load

    return _load(*args, **kwargs)


__all__ = ["load", "RuntimeOptions", "SamplingParams", "EdgeVilaError", "CheckpointError", "InputError", "ContextOverflowError",
           "__version__"]
