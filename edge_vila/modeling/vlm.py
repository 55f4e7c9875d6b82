"""The VLM: vision tower -> projector -> decoder, as four small parts (nanoVLM style)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import VilaConfig
from .int8 import INT8_FILE, fake_quant_vision, load_int8
from .llm import DecoderLM, load_decoder
from .projector import MultimodalProjector, load_projector
from .vision import VisionTower, load_vision_tower


class ImageEncoder(nn.Module):
    """pixels -> image embeddings: the part exported as vision.onnx and INT8-calibrated.
    Without a projector (dynamic_s2, whose projector takes features merged across tiles and
    scales: edge_vila.s2) it is the ViT alone: pixels -> features."""

    def __init__(self, vision: VisionTower, projector: MultimodalProjector | None):
        super().__init__()
        self.vision, self.projector = vision, projector

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.vision(pixels)
        return feats if self.projector is None else self.projector(feats)


def image_encoder(cfg: VilaConfig, vision: VisionTower, projector: MultimodalProjector) -> ImageEncoder:
    """The vision.onnx part of a model: ViT + projector, or the ViT alone for dynamic_s2."""
    return ImageEncoder(vision, None if cfg.preprocess.s2 else projector)


class VLM(nn.Module):
    def __init__(self, cfg: VilaConfig, llm: DecoderLM, vision: VisionTower | None,
                 projector: MultimodalProjector | None):
        super().__init__()
        self.cfg = cfg
        self.llm = llm
        self.vision = vision
        self.projector = projector

    @classmethod
    def load(cls, cfg: VilaConfig, dtype: torch.dtype = torch.float32) -> "VLM":
        llm = load_decoder(cfg.llm_dir, cfg.llm, dtype)
        if not cfg.is_multimodal:
            return cls(cfg, llm, None, None)
        vlm = cls(cfg, llm, load_vision_tower(cfg, dtype), load_projector(cfg.projector_dir, cfg.projector, dtype))
        int8 = cfg.root / INT8_FILE
        if int8.is_file():  # a quantized checkpoint: the reference computes what the INT8 ViT computes
            fake_quant_vision(vlm.image_encoder(), load_int8(int8))
        return vlm

    def image_encoder(self) -> ImageEncoder:
        return image_encoder(self.cfg, self.vision, self.projector)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N,3,H,W] -> [N, tokens_per_image, llm hidden] (dynamic_s2: the ViT's features)."""
        if self.vision is None:
            raise ValueError("this is a text-only model: it has no vision tower")
        return self.image_encoder()(pixels)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """dynamic_s2's second stage: merged features [B, g·g, C·scales] -> tokens [B, t·t, D]."""
        return self.projector(features)
