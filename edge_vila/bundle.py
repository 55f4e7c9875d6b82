"""The bundle: the one artifact that crosses from workstation to device.

    bundle/
      manifest.json      format version, dims, template, preprocessing, quant, sha256 of files
      tokenizer.json (+ tokenizer_config.json)
      embed.safetensors  token embeddings, looked up on the host
      vision.onnx        pixels[N,3,H,W] -> image_embeds[N,T,D]      (multimodal bundles)
      llm.onnx           inputs_embeds + position_ids + past K/V -> logits + present K/V
      report.json        quality of the bundle against the float model
      engines/<trt>-sm<XY>-<jetpack>/   TensorRT engines built on the device

Reading needs no torch. Every problem is a one-line BundleError naming the file.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .config import ImageTokens, PreprocessSpec
from .errors import CheckpointError
from .fsutil import checked_sha256

FORMAT = "edge-vila-bundle"
FORMAT_VERSION = 1


class BundleError(CheckpointError):
    """A bundle is missing files, corrupted, or from a newer toolchain."""


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


@dataclass(frozen=True)
class ModelInfo:
    """manifest.json `model`: the LLM's dimensions (what a device needs of config.LLMSpec)."""
    family: str
    hidden_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    max_context: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    intermediate_size: int | None = None
    params: int | None = None
    tie_word_embeddings: bool = False


@dataclass(frozen=True)
class TemplateInfo:
    """manifest.json `template`: the chat template's name and its system prompt."""
    name: str
    system: str | None = None


@dataclass(frozen=True)
class Manifest:
    """manifest.json, version FORMAT_VERSION: written by export, read by every backend, the
    TensorRT builder and the Jetson layer. Fields with a default may be absent (bundles from
    before they existed mean the default); a missing required field, an unknown field or a
    wrong type is refused with one line. docs/bundle-format.md documents every field (a test
    holds the two together)."""
    format: str
    format_version: int
    model: ModelInfo
    template: TemplateInfo
    files: dict[str, str]                          # every other file -> its sha256
    created: str | None = None
    image_token: str = "<image>"
    tokens_per_image: int = 0                      # embeddings per vision input; 0: text-only
    image_tokens: dict | None = None               # config.ImageTokens; absent: VILA1.5's rule
    vision_dims: dict | None = None                # ViT and projector sizes, for the memory budget
    num_video_frames: int | None = None
    preprocess: dict | None = None                 # config.PreprocessSpec; None: text-only
    quant: dict = field(default_factory=dict)      # llm, group_size, zero_point, int4_encoding, vision...
    io: dict = field(default_factory=dict)         # ONNX input/output names, kv_layout, kv_dtype, head_dtype
    toolchain: dict = field(default_factory=dict)  # versions that wrote the bundle
    source: str | None = None                      # the checkpoint it was exported from

    @classmethod
    def from_dict(cls, d: dict, path: Path | str = "manifest.json") -> "Manifest":
        if not isinstance(d, dict):
            raise BundleError(f"{path}: expected a JSON object, got {type(d).__name__}")
        top = _fields(cls, d, path, "")
        top["model"] = cls._part(ModelInfo, top["model"], path, "model.")
        top["template"] = cls._part(TemplateInfo, top["template"], path, "template.")
        return cls(**top)

    @staticmethod
    def _part(kind, d, path, prefix: str):
        if not isinstance(d, dict):
            raise BundleError(f"{path}: '{prefix.rstrip('.')}' must be an object")
        return kind(**_fields(kind, d, path, prefix))

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        d = self.to_dict()
        return {k: d[k] for k in ("model", "template", "quant", "tokens_per_image", "image_tokens", "preprocess",
                                  "toolchain")}


_JSON_TYPES = {"str": str, "int": int, "bool": bool, "dict": dict, "list": list}


def _fields(kind, d: dict, path, prefix: str) -> dict:
    """`d`'s fields of dataclass `kind`, checked: no unknown keys, every required one there,
    each of its annotated JSON type (nested objects are checked by their own dataclass)."""
    known = {f.name: f for f in fields(kind)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise BundleError(f"{path}: unknown field '{prefix}{unknown[0]}' (this edge-vila reads format_version "
                          f"{FORMAT_VERSION}: {', '.join(known)})")
    for name, f in known.items():
        if name not in d:
            if f.default is MISSING and f.default_factory is MISSING:
                raise BundleError(f"{path}: missing field '{prefix}{name}'")
            continue
        v, want = d[name], str(f.type).split("[")[0].split(" |")[0]
        if v is None and "None" in str(f.type):
            continue
        t = _JSON_TYPES.get(want)
        if t is not None and (not isinstance(v, t) or (t is int and isinstance(v, bool))):
            raise BundleError(f"{path}: field '{prefix}{name}' is {type(v).__name__} {v!r:.40}, expected {want}")
    return dict(d)


class BundleConfig:
    """What Pipeline needs of a bundle, from its Manifest (the attributes Pipeline reads of a
    checkpoint's VilaConfig: llm, chat_template, preprocess, image_tokens, ...)."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest
        self.llm = manifest.model
        self.llm_dir = root
        self.chat_template = manifest.template.name
        self.system = manifest.template.system
        self.tokens_per_image = manifest.tokens_per_image
        pre = manifest.preprocess
        self.preprocess = PreprocessSpec(**pre) if pre else None
        it = manifest.image_tokens
        self.image_tokens = ImageTokens(**it) if it else ImageTokens(per_tile=self.tokens_per_image)
        self.max_context = manifest.model.max_context
        self.num_video_frames = manifest.num_video_frames or 8  # text-only bundles: null

    @property
    def is_multimodal(self) -> bool:
        return self.preprocess is not None and "vision.onnx" in self.manifest.files

    def summary(self) -> dict:
        return {"path": str(self.root), "kind": "bundle", **self.manifest.summary()}


def read_manifest(root: str | Path, verify: bool = True) -> Manifest:
    root = Path(root)
    path = root / "manifest.json"
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle folder")
    if not path.is_file():
        raise BundleError(f"{path}: missing (not an edge-vila bundle)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else raw
        raise BundleError(f"{path}: format {got!r:.40}, expected {FORMAT!r}")
    ver = raw.get("format_version")
    if not isinstance(ver, int) or ver > FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {ver!r} is newer than this edge-vila reads ({FORMAT_VERSION}); "
                          "upgrade edge-vila on this device")
    man = Manifest.from_dict(raw, path)
    for name, digest in man.files.items():
        f = root / name
        if not f.is_file():
            raise BundleError(f"{f}: missing (listed in manifest.json)")
        if verify and checked_sha256(f) != digest:
            raise BundleError(f"{f}: sha256 mismatch (file changed or corrupted since export)")
    return man


def load_bundle_config(root: str | Path, verify: bool = True) -> BundleConfig:
    root = Path(root)
    return BundleConfig(root, read_manifest(root, verify))
