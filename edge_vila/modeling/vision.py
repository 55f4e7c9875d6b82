"""Vision tower wrapper: an HF SigLIP or CLIP vision model plus VILA's feature selection
(`mm_vision_select_layer`, `mm_vision_select_feature`)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import VilaConfig
from ..errors import CheckpointError


def vision_model_class(kind: str):
    from transformers import CLIPVisionModel, SiglipVisionModel

    return {"siglip": SiglipVisionModel, "clip": CLIPVisionModel}[kind]


class VisionTower(nn.Module):
    def __init__(self, model: nn.Module, select_layer: int, select_feature: str, has_cls: bool):
        super().__init__()
        self.model = model
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.has_cls = has_cls
        # resolved once, off the per-batch path; a plain tuple, so the submodules are not
        # registered a second time (state_dict keys stay the HF model's)
        self._parts = _tower_parts(model)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._parts is None:  # an unfamiliar layout: run it whole and pick the layer
            feats = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[self.select_layer]
        else:
            # Only the layers up to the selected one run: VILA selects layer -2, so the last
            # layer, post-LayerNorm and SigLIP's pooling head would be computed and thrown
            # away (a quarter of the tiny ViT's time in training, and in vision.onnx).
            embeddings, pre_norm, layers = self._parts
            stop = self.select_layer % (len(layers) + 1)  # hidden_states index: 0 = embeddings
            feats = embeddings(pixels)
            if pre_norm is not None:
                feats = pre_norm(feats)
            for layer in layers[:stop]:
                feats = layer(feats, None)
                feats = feats[0] if isinstance(feats, tuple) else feats
        if self.select_feature == "patch" and self.has_cls:
            feats = feats[:, 1:]  # CLIP's class token is dropped; SigLIP has none
        return feats


def _tower_parts(model: nn.Module):
    """(embeddings, CLIP's pre-LayerNorm or None, encoder layers) of an HF SigLIP/CLIP
    vision model — transformers 5 holds them on the model, 4.x under `.vision_model`."""
    root = getattr(model, "vision_model", model)
    layers = getattr(getattr(root, "encoder", None), "layers", None)
    if not hasattr(root, "embeddings") or layers is None:
        return None
    return root.embeddings, getattr(root, "pre_layrnorm", None), layers


def load_vision_tower(cfg: VilaConfig, dtype: torch.dtype = torch.float32) -> VisionTower:
    assert cfg.vision is not None and cfg.vision_dir is not None
    from transformers.utils import logging as hf_logging

    cls = vision_model_class(cfg.vision.kind)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor bar for a few files is noise in `edge-vila chat`
    try:
        model, info = cls.from_pretrained(str(cfg.vision_dir), dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{cfg.vision_dir}: vision tower failed to load ({str(e).splitlines()[0]})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    # transformers would silently random-init missing tensors; a checkpoint must be complete
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    if missing:
        raise CheckpointError(f"{cfg.vision_dir}: vision tower weights missing {sorted(missing)[:3]}")
    return VisionTower(model.eval(), cfg.select_layer, cfg.select_feature, cfg.vision.has_cls).eval()


def save_vision_tower(model: nn.Module, folder: Path) -> None:
    model.save_pretrained(str(folder), safe_serialization=True)
