"""The recipe: one dataclass, loaded from YAML, with `--set a.b=c` style overrides."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError

STAGE_KINDS = ("clip", "align", "pretrain", "sft")
PARTS = ("vision", "projector", "llm")


@dataclass
class ModelConfig:
    """The tiny preset (used when no real LLM / vision folder is given)."""
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 4
    vision_heads: int = 4
    # std of the tiny ViT's position-embedding init. SigLIP's 1/sqrt(width) (0.1 at width 96)
    # leaves position ~8x weaker than patch content: the features then barely say where a
    # patch is and "where is the red circle?" stays at chance. 1.0 matches the content scale.
    vision_pos_init_std: float = 1.0
    llm_hidden: int = 128
    llm_layers: int = 4
    llm_heads: int = 4
    llm_kv_heads: int = 2
    intermediate: int = 384
    vocab_size: int = 640
    projector: str = "mlp_downsample"
    select_layer: int = -2
    template: str = "edge"
    max_position: int = 1024
    llm: str | None = None  # HF LLM folder (e.g. SmolLM2-135M) instead of the tiny LLM
    vision_tower: str | None = None  # HF SigLIP/CLIP vision folder instead of the tiny ViT
    init: str | None = None  # a VILA checkpoint to continue from (skips the tower set-up)

    def __post_init__(self) -> None:
        _numbers(self, "model")


def _numbers(obj: Any, where: str) -> None:
    """YAML 1.1 reads `3e-4` (no dot) as a string; accept it, and name the field when a
    number field holds something that is not a number."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        want = {"float": float, "int": int}.get(str(f.type).split(" |")[0])
        if want is None or v is None or (isinstance(v, want) and not isinstance(v, bool)):
            continue
        try:
            num = float(v)
            if want is int and num != int(num):
                raise ValueError
            setattr(obj, f.name, want(num))
        except (TypeError, ValueError):
            raise InputError(f"{where}: {f.name} must be a{'n integer' if want is int else ' number'}, got {v!r}") from None


@dataclass
class StageConfig:
    kind: str  # clip | align | pretrain | sft
    steps: int
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # learning-rate multiplier per part; 0 freezes it (requires_grad False, not in the optimizer)
    train: dict[str, float] = field(default_factory=dict)
    # data mix (weights) for this stage: captions, interleaved, text, vqa, multi
    mix: dict[str, float] = field(default_factory=dict)
    # several samples per row (block-causal mask, positions restart): same loss, fewer tokens
    pack: bool = True
    save_every: int = 100
    log_every: int = 10

    def __post_init__(self) -> None:
        _numbers(self, f"stage {self.kind}")
        if self.kind not in STAGE_KINDS:
            raise InputError(f"stage kind {self.kind!r} unknown (expected one of {', '.join(STAGE_KINDS)})")
        if not isinstance(self.pack, bool):
            raise InputError(f"stage {self.kind}: pack must be true or false, got {self.pack!r}")
        bad = set(self.train) - set(PARTS)
        if bad:
            raise InputError(f"stage {self.kind}: train has unknown parts {sorted(bad)} (expected {PARTS})")


@dataclass
class RecipeConfig:
    name: str = "tiny"
    seed: int = 0
    threads: int | None = None
    text_blend: bool = True  # SFT mixes in text-only data (VILA: protects text ability)
    # a frozen vision tower's forward in bfloat16 ("auto": where the CPU has native bf16 or on
    # CUDA). It is only a feature extractor then; the bundle runs it in INT8 anyway.
    frozen_vision_dtype: str = "auto"  # auto | bf16 | fp32
    eval_n: int = 500
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: list[StageConfig] = field(default_factory=list)
    data: dict[str, str] = field(default_factory=dict)  # optional real data: llava_json, mmc4_jsonl, image_root

    def __post_init__(self) -> None:
        _numbers(self, "recipe")
        if self.frozen_vision_dtype not in ("auto", "bf16", "fp32"):
            raise InputError(f"recipe: frozen_vision_dtype must be auto, bf16 or fp32, got {self.frozen_vision_dtype!r}")

    @classmethod
    def from_dict(cls, d: dict, src: str = "recipe") -> "RecipeConfig":
        d = dict(d)
        try:
            model = ModelConfig(**d.pop("model", {}))
            stages = [StageConfig(**s) for s in d.pop("stages", [])]
            cfg = cls(**d, model=model, stages=stages)
        except TypeError as e:
            raise InputError(f"{src}: {e}") from None
        if not cfg.stages:
            raise InputError(f"{src}: no stages")
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: str) -> Any:
    return yaml.safe_load(value)


def apply_override(d: dict, dotted: str) -> None:
    """'stages.3.steps=200' or 'model.llm=path' on the raw dict (before dataclasses)."""
    if "=" not in dotted:
        raise InputError(f"override {dotted!r}: expected KEY=VALUE (e.g. stages.0.steps=100)")
    key, value = dotted.split("=", 1)
    parts = key.split(".")
    node: Any = d
    for p in parts[:-1]:
        try:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        except (IndexError, ValueError):
            raise InputError(f"override {key!r}: no element {p!r}") from None
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = _coerce(value)
    else:
        node[last] = _coerce(value)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> RecipeConfig:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({e})") from None
    for o in overrides:
        apply_override(raw, o)
    return RecipeConfig.from_dict(raw, str(path))
