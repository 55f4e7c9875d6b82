"""vision.onnx: pixels [N,3,H,W] -> image embeddings [N,T,D] (vision tower + projector)."""
from __future__ import annotations

from pathlib import Path

import torch

from edge_vila.modeling.vlm import ImageEncoder


def export_vision(enc: ImageEncoder, out: Path, image_size: tuple[int, int], opset: int = 21) -> Path:
    h, w = image_size
    n = torch.export.Dim("num_images", min=1, max=64)
    with torch.no_grad():
        prog = torch.onnx.export(enc.eval(), (torch.randn(2, 3, h, w),), dynamo=True, opset_version=opset,
                                 input_names=["pixels"], output_names=["image_embeds"],
                                 dynamic_shapes={"pixels": {0: n}}, optimize=True, verbose=False)
    prog.save(str(out), external_data=False)
    return out
