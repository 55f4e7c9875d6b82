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
from dataclasses import dataclass
from pathlib import Path

from .config import ImageTokens, PreprocessSpec
from .errors import CheckpointError
from .fsutil import sha256_file

FORMAT = "edge-vila-bundle"
FORMAT_VERSION = 1


class BundleError(CheckpointError):
    """A bundle is missing files, corrupted, or from a newer toolchain."""


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


@dataclass
class BundleLLM:
    """The subset of LLMSpec the runtime needs (duck-typed with config.LLMSpec)."""
    family: str
    hidden_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    quantization: dict | None = None


class BundleConfig:
    """What Pipeline needs, read from manifest.json (mirrors VilaConfig's attributes)."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        m = manifest["model"]
        self.llm = BundleLLM(**{k: m[k] for k in BundleLLM.__dataclass_fields__ if k in m})
        self.llm_dir = root
        self.chat_template = manifest["template"]["name"]
        self.system = manifest["template"].get("system")
        self.tokens_per_image = int(manifest.get("tokens_per_image", 0))
        pre = manifest.get("preprocess")
        self.preprocess = PreprocessSpec(**pre) if pre else None
        it = manifest.get("image_tokens")
        self.image_tokens = ImageTokens(**it) if it else ImageTokens(per_tile=self.tokens_per_image)
        self.max_context = int(m["max_context"])
        self.num_video_frames = int(manifest.get("num_video_frames") or 8)  # text-only bundles: null

    @property
    def is_multimodal(self) -> bool:
        return self.preprocess is not None and "vision.onnx" in self.manifest["files"]

    def summary(self) -> dict:
        return {"path": str(self.root), "kind": "bundle", **{k: self.manifest[k] for k in
                                                               ("model", "template", "quant", "tokens_per_image",
                                                                "image_tokens", "preprocess", "toolchain") if k in self.manifest}}


def read_manifest(root: str | Path, verify: bool = True) -> dict:
    root = Path(root)
    path = root / "manifest.json"
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle folder")
    if not path.is_file():
        raise BundleError(f"{path}: missing (not an edge-vila bundle)")
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    if man.get("format") != FORMAT:
        raise BundleError(f"{path}: format {man.get('format')!r}, expected {FORMAT!r}")
    ver = man.get("format_version")
    if not isinstance(ver, int) or ver > FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {ver!r} is newer than this edge-vila reads ({FORMAT_VERSION}); "
                          "upgrade edge-vila on this device")
    for key in ("model", "template", "files"):
        if key not in man:
            raise BundleError(f"{path}: missing key '{key}'")
    for name, digest in man["files"].items():
        f = root / name
        if not f.is_file():
            raise BundleError(f"{f}: missing (listed in manifest.json)")
        if verify and sha256_file(f) != digest:
            raise BundleError(f"{f}: sha256 mismatch (file changed or corrupted since export)")
    return man


def load_bundle_config(root: str | Path, verify: bool = True) -> BundleConfig:
    root = Path(root)
    return BundleConfig(root, read_manifest(root, verify))
