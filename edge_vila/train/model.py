"""The trainable VLM (vision tower + projector + our decoder) and the CLIP objective
for stage 0. Saves to and loads from the VILA checkpoint layout."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LLMSpec, ProjectorSpec, VilaConfig, load_config
from ..modeling.llm import DecoderLM, load_decoder
from ..modeling.projector import MultimodalProjector, load_projector
from ..modeling.vision import VisionTower, load_vision_tower, vision_model_class
from .config import ModelConfig
from .data import IGNORE, IMAGE_SLOT

log = logging.getLogger(__name__)


class TrainVLM(nn.Module):
    def __init__(self, vision: VisionTower, projector: MultimodalProjector, llm: DecoderLM, llm_config: dict,
                 processor: dict, template: str, aspect: str = "resize"):
        super().__init__()
        self.vision, self.projector, self.llm = vision, projector, llm
        self.llm_config, self.processor, self.template, self.aspect = llm_config, processor, template, aspect
        self.frozen_vision_bf16 = False  # set per stage by the training loop

    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The tower's selected features; a frozen tower may run in bf16 (2.3x faster on CPUs
        with native bf16), as a feature extractor whose output goes on in float32."""
        if self.frozen_vision_bf16 and not any(p.requires_grad for p in self.vision.parameters()):
            with torch.no_grad(), torch.autocast(pixels.device.type, dtype=torch.bfloat16):
                return self.vision(pixels).float()
        return self.vision(pixels)

    def parts(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "projector": self.projector, "llm": self.llm}

    def forward(self, ids: torch.Tensor, labels: torch.Tensor, pixels: torch.Tensor | None,
                positions: torch.Tensor | None = None, segments: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token loss over labelled positions; image slots get projected features.
        Packed rows (data.collate(pack=True)) pass per-token positions and segment ids."""
        slots = ids == IMAGE_SLOT
        emb = self.llm.model.embed_tokens(ids.clamp(min=0))
        if pixels is not None and slots.any():
            feats = self.projector(self.vision_features(pixels))  # [N, T, D], in order of appearance
            emb = emb.masked_scatter(slots[..., None], feats.reshape(-1, feats.shape[-1]).to(emb.dtype))
        if segments is None:
            h = self.llm.hidden(emb, torch.arange(ids.shape[1]))
        else:  # block-causal: a token sees the earlier tokens of its own sample only
            L = ids.shape[1]
            causal = torch.ones(L, L, dtype=torch.bool).tril()
            mask = (segments[:, :, None] == segments[:, None, :]) & causal
            h = self.llm.hidden(emb, positions, mask[:, None])
        tgt = labels[:, 1:]
        keep = tgt != IGNORE
        logits = self.llm.lm_head(h[:, :-1][keep])  # only where a label exists: saves the vocab matmul
        return F.cross_entropy(logits.float(), tgt[keep])

    def save(self, out: Path, tokenizer_dir: Path) -> Path:
        from ..checkpoint import write_checkpoint

        return write_checkpoint(out, llm_config=self.llm_config, llm_state=self.llm.state_dict(),
                                tokenizer=tokenizer_dir, vision=self.vision.model, image_processor=self.processor,
                                projector=self.projector, select_layer=self.vision.select_layer,
                                select_feature=self.vision.select_feature, aspect=self.aspect,
                                chat_template=self.template, extra={"edge_vila_world": "shapes"})


def _tiny_processor(size: int) -> dict:
    return {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
            "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def build_model(m: ModelConfig, tokenizer_dir: Path, vocab_size: int, bos: int | None, eos: int | None,
                pad: int | None) -> TrainVLM:
    """Tiny preset, optionally with a real LLM and/or vision folder, or continue from `init`."""
    if m.init:
        return load_model(Path(m.init), m.template)
    from transformers import SiglipVisionConfig

    if m.vision_tower:
        vcfg = load_config_vision(Path(m.vision_tower))
        kind, vdir = vcfg
        vmodel = vision_model_class(kind).from_pretrained(m.vision_tower).eval()
        proc_path = Path(m.vision_tower) / "preprocessor_config.json"
        processor = json.loads(proc_path.read_text()) if proc_path.is_file() else _tiny_processor(vmodel.config.image_size)
        has_cls = kind == "clip"
    else:
        vmodel = vision_model_class("siglip")(SiglipVisionConfig(
            hidden_size=m.vision_hidden, intermediate_size=4 * m.vision_hidden, num_hidden_layers=m.vision_layers,
            num_attention_heads=m.vision_heads, image_size=m.image_size, patch_size=m.patch_size))
        nn.init.normal_(vmodel.embeddings.position_embedding.weight, 0.0, m.vision_pos_init_std)
        processor, has_cls = _tiny_processor(m.image_size), False
    vision = VisionTower(vmodel, m.select_layer, "patch" if has_cls else "cls_patch", has_cls)

    if m.llm:
        cfg = load_config(m.llm)
        llm = load_decoder(cfg.llm_dir, cfg.llm)
        llm_config = json.loads((Path(m.llm) / "config.json").read_text())
    else:
        llm_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
                      "hidden_size": m.llm_hidden, "intermediate_size": m.intermediate,
                      "num_hidden_layers": m.llm_layers, "num_attention_heads": m.llm_heads,
                      "num_key_value_heads": m.llm_kv_heads, "max_position_embeddings": m.max_position,
                      "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
                      "hidden_act": "silu", "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
                      "attention_bias": False, "mlp_bias": False}
        llm = DecoderLM(LLMSpec.from_hf(llm_config, "tiny preset"))
        _init_decoder(llm)
    projector = MultimodalProjector(ProjectorSpec(m.projector, vmodel.config.hidden_size, llm.spec.hidden_size))
    return TrainVLM(vision, projector, llm, llm_config, processor, m.template)


def load_config_vision(folder: Path) -> tuple[str, Path]:
    from ..config import VisionSpec
    from ..fsutil import read_json

    spec = VisionSpec.from_hf(read_json(folder / "config.json", "vision config"), folder / "config.json")
    return spec.kind, folder


def _init_decoder(llm: DecoderLM, std: float = 0.02) -> None:
    """GPT-2 style init; residual output projections scaled by depth."""
    for name, p in llm.named_parameters():
        if p.dim() == 2:
            s = std / math.sqrt(2 * llm.spec.num_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            nn.init.normal_(p, 0.0, s)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


def load_model(ckpt: Path, template: str | None = None) -> TrainVLM:
    cfg: VilaConfig = load_config(ckpt)
    llm = load_decoder(cfg.llm_dir, cfg.llm)
    vision = load_vision_tower(cfg)
    projector = load_projector(cfg.projector_dir, cfg.projector)
    processor = json.loads((cfg.vision_dir / "preprocessor_config.json").read_text())
    llm_config = json.loads((cfg.llm_dir / "config.json").read_text())
    return TrainVLM(vision, projector, llm, llm_config, processor, template or cfg.chat_template or "edge",
                    cfg.preprocess.mode)


class ClipObjective(nn.Module):
    """Stage 0 (CLIP): InfoNCE between pooled vision-tower features and a small text
    encoder over captions, with a learnable temperature (init 1/0.07, capped at 100)."""

    def __init__(self, vision: VisionTower, vocab_size: int, width: int = 128, layers: int = 2, dim: int = 128):
        super().__init__()
        self.vision = vision
        spec = LLMSpec(family="llama", vocab_size=vocab_size, hidden_size=width, intermediate_size=3 * width,
                       num_layers=layers, num_heads=4, num_kv_heads=4, head_dim=width // 4, rms_norm_eps=1e-5,
                       rope_theta=10000.0, rope_scaling=None, attention_bias=False, tie_word_embeddings=True,
                       max_position_embeddings=256, bos_token_id=None, eos_token_ids=[])
        self.text = DecoderLM(spec)
        _init_decoder(self.text)
        self.img_norm = nn.LayerNorm(vision.model.config.hidden_size)
        self.img_proj = nn.Linear(vision.model.config.hidden_size, dim, bias=False)
        self.txt_proj = nn.Linear(width, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        img = self.img_proj(self.img_norm(self.vision(pixels).mean(dim=1)))
        h = self.text.hidden(self.text.model.embed_tokens(ids), torch.arange(ids.shape[1]))
        txt = self.txt_proj(h[torch.arange(ids.shape[0]), lengths - 1])  # the last (EOS) token
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.t()
        target = torch.arange(len(img))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
