"""vision.onnx: pixels [N,3,H,W] -> image embeddings [N,T,D] (vision tower + projector);
for dynamic_s2 (NVILA) vision.onnx is the tower alone (-> features [N,P,C]) and
projector.onnx takes the blocks of features the host merged across scales (edge_vila.s2)."""
from __future__ import annotations

from pathlib import Path

import torch

from edge_vila.modeling.projector import MultimodalProjector
from edge_vila.modeling.vlm import ImageEncoder


def export_vision(enc: ImageEncoder, out: Path, image_size: tuple[int, int], opset: int = 21) -> Path:
    h, w = image_size
    n = torch.export.Dim("num_images", min=1, max=64)
    name = "image_embeds" if enc.projector is not None else "image_features"
    with torch.no_grad():
        prog = torch.onnx.export(enc.eval(), (torch.randn(2, 3, h, w),), dynamo=True, opset_version=opset,
                                 input_names=["pixels"], output_names=[name],
                                 dynamic_shapes={"pixels": {0: n}}, optimize=True, verbose=False)
    prog.save(str(out), external_data=False)
    return out


def export_projector(proj: MultimodalProjector, out: Path, patches: int, channels: int, opset: int = 21) -> Path:
    """projector.onnx: image_features [B, patches, channels] -> image_embeds [B, T, D], float."""
    n = torch.export.Dim("num_blocks", min=1, max=64)
    with torch.no_grad():
        prog = torch.onnx.export(proj.eval(), (torch.randn(2, patches, channels),), dynamo=True,
                                 opset_version=opset, input_names=["image_features"], output_names=["image_embeds"],
                                 dynamic_shapes={"x": {0: n}}, optimize=True, verbose=False)
    prog.save(str(out), external_data=False)
    return out
