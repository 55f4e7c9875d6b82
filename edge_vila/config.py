"""Model description parsed from a VILA-layout checkpoint (no torch needed).

A VILA1.5 checkpoint is a folder with `config.json` (architectures `LlavaLlamaModel`,
`mm_projector_type`, `mm_vision_select_layer`, `mm_vision_select_feature`,
`image_aspect_ratio`, `llm_cfg` / `vision_tower_cfg` / `mm_projector_cfg`) and the
sub-folders `llm/`, `vision_tower/`, `mm_projector/`. A plain Hugging Face causal-LM
folder is accepted too and runs as a text-only model.

Everything here is validated up front so that a bad checkpoint fails with one line
naming the file and key, not deep inside torch.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from .errors import CheckpointError
from .fsutil import read_json
from .released import template_for_name

LLM_FAMILIES = ("llama", "qwen2")
VISION_TYPES = {"siglip_vision_model": "siglip", "siglip": "siglip",
                "clip_vision_model": "clip", "clip": "clip"}
PROJECTOR_TYPES = ("linear", "mlp2x_gelu", "mlp_downsample", "mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix")
# side of the square of ViT patches each projector folds into one LLM token
PROJECTOR_FOLD = {"mlp_downsample": 2, "mlp_downsample_2x2_fix": 2, "mlp_downsample_3x3_fix": 3}
SELECT_FEATURES = ("patch", "cls_patch")
ASPECT_MODES = ("resize", "pad", "dynamic", "dynamic_s2")
VILA_ARCHITECTURES = ("LlavaLlamaModel", "LlavaLlamaForCausalLM", "LlavaQwenForCausalLM")


def _need(cfg: dict, key: str, src: Path) -> int:
    """A required positive integer field."""
    if key not in cfg:
        raise CheckpointError(f"{src}: missing key '{key}'")
    val = cfg[key]
    if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
        raise CheckpointError(f"{src}: key '{key}' should be a positive integer, got {val!r}")
    return val


@dataclass
class LLMSpec:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    attention_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    quantization: dict | None = None  # e.g. {"quant_method": "awq", "bits": 4, "group_size": 128, ...}

    @classmethod
    def from_hf(cls, cfg: dict, src: Path) -> "LLMSpec":
        family = cfg.get("model_type")
        if family not in LLM_FAMILIES:
            raise CheckpointError(f"{src}: model_type {family!r} is not supported "
                                  f"(expected one of {', '.join(LLM_FAMILIES)})")
        hidden = _need(cfg, "hidden_size", src)
        heads = _need(cfg, "num_attention_heads", src)
        if hidden % heads and "head_dim" not in cfg:
            raise CheckpointError(f"{src}: hidden_size {hidden} not divisible by num_attention_heads {heads}")
        # transformers >= 5 nests rope settings in rope_parameters; older files use rope_theta/rope_scaling
        rope = cfg.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = cfg.get("rope_scaling")
        if rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise CheckpointError(f"{src}: rope scaling type {kind!r} not supported (expected linear or llama3)")
            if kind == "default":
                scaling = None
        q = cfg.get("quantization_config")
        if q and (q.get("quant_method") != "awq" or q.get("bits", 4) != 4 or q.get("version", "gemm") != "gemm"):
            raise CheckpointError(f"{src}: quantization_config {q} not supported (expected AWQ 4-bit GEMM)")
        if cfg.get("mlp_bias"):
            raise CheckpointError(f"{src}: mlp_bias=true is not supported")
        eos = cfg.get("eos_token_id")
        eos_list = [eos] if isinstance(eos, int) else list(eos or [])
        kv = cfg.get("num_key_value_heads") or heads
        if heads % kv:
            raise CheckpointError(f"{src}: num_attention_heads {heads} not a multiple of num_key_value_heads {kv}")
        return cls(
            family=family,
            vocab_size=_need(cfg, "vocab_size", src),
            hidden_size=hidden,
            intermediate_size=_need(cfg, "intermediate_size", src),
            num_layers=_need(cfg, "num_hidden_layers", src),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            # Qwen2 always has q/k/v biases; Llama only when attention_bias is set
            attention_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_list,
            quantization=cfg.get("quantization_config"),
        )

    @property
    def num_params(self) -> int:
        h, i, L, v = self.hidden_size, self.intermediate_size, self.num_layers, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        per_layer = attn + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + L * per_layer + h


@dataclass
class VisionSpec:
    kind: str  # siglip | clip
    hidden_size: int
    image_size: int
    patch_size: int
    num_layers: int

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def has_cls(self) -> bool:
        return self.kind == "clip"

    @classmethod
    def from_hf(cls, cfg: dict, src: Path) -> "VisionSpec":
        if "vision_config" in cfg:  # a full CLIP/SigLIP config: take its vision half
            cfg = dict(cfg["vision_config"], model_type=cfg.get("model_type", "") + "_vision_model")
        mt = cfg.get("model_type")
        if mt not in VISION_TYPES:
            raise CheckpointError(f"{src}: vision model_type {mt!r} is not supported "
                                  f"(expected siglip_vision_model or clip_vision_model)")
        return cls(kind=VISION_TYPES[mt], hidden_size=_need(cfg, "hidden_size", src),
                   image_size=_need(cfg, "image_size", src), patch_size=_need(cfg, "patch_size", src),
                   num_layers=_need(cfg, "num_hidden_layers", src))


@dataclass
class PreprocessSpec:
    """How an image becomes pixels; mirrored into the bundle manifest."""
    height: int
    width: int
    mean: list[float]
    std: list[float]
    mode: str = "resize"  # resize | pad (pad to square with the mean colour, then resize) | dynamic (tiles)
    resample: int = 3  # PIL enum: 3 = bicubic, 2 = bilinear
    rescale_factor: float = 1 / 255
    # dynamic mode (NVILA-Lite): an image alone in a message is cut into 1..max_tiles tiles of
    # height x width on the grid closest to its aspect ratio, plus a thumbnail when there is
    # more than one tile (VILA's dynamic_preprocess; its defaults are 1 and 12)
    min_tiles: int = 1
    max_tiles: int = 1
    # dynamic_s2 (NVILA): the S2 scales, smallest (= the tile size) first; a lone image takes
    # (s/s0)^2 square tiles per smaller scale plus the last scale's dynamic grid (edge_vila.s2)
    s2_scales: list[int] = field(default_factory=list)

    @property
    def tiled(self) -> bool:
        """dynamic mode: every tile is a vision input with its own tokens (and marker)."""
        return self.mode == "dynamic"

    @property
    def s2(self) -> bool:
        """dynamic_s2: the tiles' features are merged across scales into one token map per image."""
        return self.mode == "dynamic_s2"

    @property
    def s2_fixed_inputs(self) -> int:
        """Tiles of the smaller S2 scales (NVILA-8B: 1 + 4), the same for every image."""
        return sum((s // self.s2_scales[0]) ** 2 for s in self.s2_scales[:-1]) if self.s2 else 0

    @property
    def max_inputs_per_image(self) -> int:
        """Vision-tower inputs one image can take: its tiles plus the thumbnail (dynamic), or
        every scale's tiles (dynamic_s2)."""
        if self.s2:
            return self.s2_fixed_inputs + self.max_tiles
        return self.max_tiles + (1 if self.tiled and self.max_tiles > 1 else 0)

    @classmethod
    def from_processor(cls, cfg: dict, src: Path, mode: str, image_size: int) -> "PreprocessSpec":
        size = cfg.get("crop_size") or cfg.get("size") or {}
        if isinstance(size, int):
            size = {"height": size, "width": size}
        h = size.get("height") or size.get("shortest_edge") or image_size
        w = size.get("width") or size.get("shortest_edge") or image_size
        mean, std = cfg.get("image_mean", [0.5] * 3), cfg.get("image_std", [0.5] * 3)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise CheckpointError(f"{src}: image_mean/image_std must be 3 numbers each (std > 0)")
        return cls(height=int(h), width=int(w), mean=[float(x) for x in mean], std=[float(x) for x in std],
                   mode=mode, resample=int(cfg.get("resample", 3)),
                   rescale_factor=float(cfg.get("rescale_factor", 1 / 255)))


def _tiles(top: dict, src: Path, pre: PreprocessSpec) -> PreprocessSpec:
    """min_tiles / max_tiles of a dynamic-mode config.json (VILA's defaults 1 and 12 when absent)."""
    lo, hi = top.get("min_tiles", 1), top.get("max_tiles", 12)
    for key, val in (("min_tiles", lo), ("max_tiles", hi)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise CheckpointError(f"{src}: key '{key}' should be a positive integer, got {val!r}")
    if lo > hi:
        raise CheckpointError(f"{src}: min_tiles {lo} is more than max_tiles {hi}")
    if pre.height != pre.width:
        raise CheckpointError(f"{src}: image_aspect_ratio 'dynamic' needs square tiles, the image processor "
                              f"gives {pre.height}x{pre.width}")
    pre.min_tiles, pre.max_tiles = lo, hi
    return pre


def _s2(top: dict, src: Path, pre: PreprocessSpec, vision_hidden: int) -> PreprocessSpec:
    """The dynamic_s2 fields of an NVILA config.json, checked against what edge_vila.s2 models:
    scales that are multiples of the tile size, the features merged at the last scale."""
    raw = top.get("s2_scales")
    try:
        scales = [int(x) for x in (raw.split(",") if isinstance(raw, str) else raw)]
    except (TypeError, ValueError, AttributeError):
        raise CheckpointError(f"{src}: key 's2_scales' should list the S2 scales (e.g. \"448,896,1344\"), "
                              f"got {raw!r}") from None
    if len(scales) < 2 or scales != sorted(set(scales)) or any(s % scales[0] for s in scales):
        raise CheckpointError(f"{src}: s2_scales {raw!r} should rise, each a multiple of the first")
    if scales[0] != pre.width:
        raise CheckpointError(f"{src}: s2_scales start at {scales[0]}, but the vision tower takes "
                              f"{pre.width}-px tiles")
    split = top.get("s2_max_split_size", scales[0])
    if split != scales[0]:
        raise CheckpointError(f"{src}: s2_max_split_size {split!r} (expected {scales[0]}, the tile size)")
    idx = top.get("s2_resize_output_to_scale_idx", -1)
    if idx not in (-1, len(scales) - 1):
        raise CheckpointError(f"{src}: s2_resize_output_to_scale_idx {idx!r} is not supported (expected -1: "
                              "features merged at the last scale, as NVILA's releases do)")
    want = vision_hidden * len(scales)
    if top.get("mm_hidden_size", want) != want:
        raise CheckpointError(f"{src}: mm_hidden_size {top['mm_hidden_size']!r}, expected {want} "
                              f"({len(scales)} scales x vision hidden {vision_hidden})")
    pre = _tiles({**top, "min_tiles": 1}, src, pre)
    least = (scales[-1] // scales[0]) ** 2
    if pre.max_tiles < least:
        raise CheckpointError(f"{src}: max_tiles {pre.max_tiles} is below the {least} tiles of the last "
                              f"S2 scale {scales[-1]}")
    pre.s2_scales, pre.min_tiles = scales, least
    return pre


@dataclass
class ImageTokens:
    r"""How an image's vision outputs sit among the LLM's positions (mirrored into the manifest).

    VILA1.5 splices each image's `per_tile` embeddings where its `<image>` marker is, and the
    API writes "<image>\n" before the text. In dynamic_s2 (NVILA) an image is one map of
    blocks x `per_tile` tokens, then end_text once. NVILA's image encoder appends the embedding of
    "\n" after every vision input (`end_text`), so its markers are written back to back
    (`marker_sep` ""); in dynamic mode VILA rewrites a lone image's marker as "<image>\n" once
    per tile (`tile_text`), each of which then takes one tile's embeddings plus `end_text`.
    """
    per_tile: int
    end_text: str = ""
    marker_sep: str = "\n"
    tile_text: str = ""

    def positions(self, inputs: int) -> int:
        r"""LLM positions of an image cut into `inputs` vision inputs (its "\n" texts count one
        token each, as in every tokenizer of the family)."""
        return inputs * (self.per_tile + bool(self.end_text) + bool(self.tile_text))

    def max_positions(self, pre: PreprocessSpec) -> int:
        r"""LLM positions one image takes at most. dynamic_s2 merges every scale into one map
        of max_tiles blocks (`per_tile` tokens each: the projector's fold of one tile's patches)
        followed by one end_text; the other modes take positions(max_inputs_per_image)."""
        if pre.s2:
            return pre.max_tiles * self.per_tile + bool(self.end_text)
        return self.positions(pre.max_inputs_per_image)

    @classmethod
    def from_config(cls, top: dict, per_tile: int, mode: str) -> "ImageTokens":
        # NVILA-generation configs carry image_encoder (VILA's BasicImageEncoder, end_tokens "\n"
        # by default) or the dynamic_s2 switch; VILA1.5's carry neither
        enc = top.get("image_encoder")
        if isinstance(enc, str):
            try:
                enc = json.loads(enc)
            except json.JSONDecodeError:
                enc = {}
        if enc is None and "dynamic_s2" not in top:
            return cls(per_tile=per_tile)
        end = (enc or {}).get("end_tokens", "\n")
        return cls(per_tile=per_tile, end_text=end or "", marker_sep="", tile_text="\n" if mode == "dynamic" else "")


@dataclass
class ProjectorSpec:
    kind: str
    in_dim: int
    out_dim: int

    @property
    def fold(self) -> int:
        return PROJECTOR_FOLD.get(self.kind, 1)

    def num_tokens(self, num_patches: int) -> int:
        if self.fold == 1:
            return num_patches
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise CheckpointError(f"{self.kind} needs a square token grid, got {num_patches} tokens")
        return math.ceil(side / self.fold) ** 2

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Weight shapes in VILA's mm_projector safetensors (nn.Sequential names)."""
        c, h = self.in_dim, self.out_dim
        if self.kind == "linear":
            return {"layers.weight": (h, c), "layers.bias": (h,)}
        if self.kind == "mlp2x_gelu":
            return {"layers.0.weight": (h, c), "layers.0.bias": (h,), "layers.2.weight": (h, h), "layers.2.bias": (h,)}
        if self.fold == 3:  # LayerNorm(9C), Linear(9C, 3C), GELU, LayerNorm(3C), Linear(3C, H), GELU, Linear(H, H)
            return {"layers.1.weight": (9 * c,), "layers.1.bias": (9 * c,), "layers.2.weight": (3 * c, 9 * c),
                    "layers.2.bias": (3 * c,), "layers.4.weight": (3 * c,), "layers.4.bias": (3 * c,),
                    "layers.5.weight": (h, 3 * c), "layers.5.bias": (h,), "layers.7.weight": (h, h),
                    "layers.7.bias": (h,)}
        return {"layers.1.weight": (4 * c,), "layers.1.bias": (4 * c,), "layers.2.weight": (h, 4 * c),
                "layers.2.bias": (h,), "layers.4.weight": (h, h), "layers.4.bias": (h,)}


@dataclass
class VilaConfig:
    root: Path
    llm_dir: Path
    llm: LLMSpec
    chat_template: str | None = None
    template_source: str = ""  # where chat_template came from (config.json, the model's name)
    vision_dir: Path | None = None
    vision: VisionSpec | None = None
    projector_dir: Path | None = None
    projector: ProjectorSpec | None = None
    select_layer: int = -2
    select_feature: str = "patch"
    preprocess: PreprocessSpec | None = None
    image_tokens: ImageTokens = field(default_factory=lambda: ImageTokens(per_tile=0))  # text-only: none
    num_video_frames: int = 8  # frames per video clip (config.json's; VILA's releases say 8)
    raw: dict = field(default_factory=dict)

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @property
    def knows_synthetic_world(self) -> bool:
        """Trained on the synthetic shapes world (the recipe's checkpoints, or any that
        says so): only then is a shapes-VQA figure meaningful. Released checkpoints and
        random-weight replicas get text perplexity only."""
        return self.is_multimodal and (self.raw.get("edge_vila_world") == "shapes" or self.chat_template == "edge")

    @property
    def num_patches(self) -> int:
        assert self.vision is not None
        n = self.vision.grid ** 2
        return n + (1 if self.vision.has_cls and self.select_feature == "cls_patch" else 0)

    @property
    def tokens_per_image(self) -> int:
        """Embeddings per vision-tower input (one image, or one tile in dynamic mode)."""
        if self.projector is None:
            return 0
        return self.projector.num_tokens(self.num_patches)

    def summary(self) -> dict:
        out = {"path": str(self.root), "kind": "vila" if self.is_multimodal else "text-only",
               "llm": asdict(self.llm), "llm_params": self.llm.num_params, "chat_template": self.chat_template,
               "template_source": self.template_source or "the tokenizer (guessed at load)"}
        if self.is_multimodal:
            out.update(vision=asdict(self.vision), projector=asdict(self.projector),
                       select_layer=self.select_layer, select_feature=self.select_feature,
                       tokens_per_image=self.tokens_per_image, preprocess=asdict(self.preprocess),
                       image_tokens=asdict(self.image_tokens))
        return out


def weight_files(folder: Path) -> list[Path]:
    """The model's safetensors (model*.safetensors when present: a quantized text-only
    folder also holds awq_result.safetensors / vision_int8.safetensors side files)."""
    files = sorted(folder.glob("model*.safetensors"))
    return files or sorted(f for f in folder.glob("*.safetensors") if f.name not in SIDE_FILES)


SIDE_FILES = ("awq_result.safetensors", "vision_int8.safetensors")


def safetensors_header(f: Path) -> tuple[int, dict]:
    """(byte offset where the tensor data starts, header dict) of one safetensors file."""
    import json
    import struct

    with open(f, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{f}: truncated safetensors file")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{f}: corrupt safetensors header") from None
    return 8 + n, header


def _safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from safetensors headers (reads no weights, needs no torch)."""
    files = weight_files(folder)
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights found")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        _, header = safetensors_header(f)
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def load_config(path: str | Path) -> VilaConfig:
    """Parse and validate a VILA checkpoint (or plain HF LLM folder) without loading weights."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: no such checkpoint folder")
    if not root.is_dir():
        raise CheckpointError(f"{root}: expected a checkpoint folder, got a file")
    top = read_json(root / "config.json", "config.json")
    archs = top.get("architectures") or []
    if not any(a in VILA_ARCHITECTURES for a in archs) and "llm_cfg" not in top:
        # plain Hugging Face causal LM: text-only model
        llm = LLMSpec.from_hf(top, root / "config.json")
        _check_weights(root)
        template = top.get("chat_template")
        return VilaConfig(root=root, llm_dir=root, llm=llm, chat_template=template,
                          template_source="config.json chat_template" if template else "", raw=top)

    src = root / "config.json"
    llm_dir, vt_dir, pj_dir = root / "llm", root / "vision_tower", root / "mm_projector"
    for d in (llm_dir, vt_dir, pj_dir):
        if not d.is_dir():
            raise CheckpointError(f"{d}: missing sub-folder (a VILA checkpoint has llm/, vision_tower/, mm_projector/)")
    llm = LLMSpec.from_hf(read_json(llm_dir / "config.json", "LLM config"), llm_dir / "config.json")
    vcfg_path = vt_dir / "config.json"
    vision = VisionSpec.from_hf(read_json(vcfg_path, "vision tower config"), vcfg_path)
    pcfg = read_json(pj_dir / "config.json", "projector config")
    kind = pcfg.get("mm_projector_type") or top.get("mm_projector_type") or \
        (top.get("mm_projector_cfg") or {}).get("mm_projector_type")
    if kind not in PROJECTOR_TYPES:
        raise CheckpointError(f"{pj_dir / 'config.json'}: mm_projector_type {kind!r} is not supported "
                              f"(expected one of {', '.join(PROJECTOR_TYPES)})")
    projector = ProjectorSpec(kind=kind, in_dim=vision.hidden_size, out_dim=llm.hidden_size)

    select_layer = top.get("mm_vision_select_layer", -2)
    if not isinstance(select_layer, int) or not -(vision.num_layers + 1) <= select_layer <= vision.num_layers:
        raise CheckpointError(f"{src}: mm_vision_select_layer {select_layer!r} out of range for a "
                              f"{vision.num_layers}-layer vision tower")
    feature = top.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURES:
        raise CheckpointError(f"{src}: mm_vision_select_feature {feature!r} (expected patch or cls_patch)")
    mode = top.get("image_aspect_ratio", "resize")
    if mode not in ASPECT_MODES:
        raise CheckpointError(f"{src}: image_aspect_ratio {mode!r} is not supported "
                              f"(expected one of {', '.join(ASPECT_MODES)})")
    if top.get("s2"):
        raise CheckpointError(f"{src}: s2 true (fixed multi-scale S2 features) is not supported "
                              "(expected false or absent; NVILA's dynamic_s2 is)")
    if bool(top.get("dynamic_s2")) != (mode == "dynamic_s2"):
        raise CheckpointError(f"{src}: dynamic_s2 {top.get('dynamic_s2')!r} disagrees with image_aspect_ratio "
                              f"{mode!r} (NVILA sets both)")
    proc_path = vt_dir / "preprocessor_config.json"
    proc = read_json(proc_path, "image processor config") if proc_path.exists() else {}
    pre = PreprocessSpec.from_processor(proc, proc_path, mode, vision.image_size)
    if pre.tiled:
        pre = _tiles(top, src, pre)
    elif pre.s2:
        pre = _s2(top, src, pre, vision.hidden_size)
        projector.in_dim = vision.hidden_size * len(pre.s2_scales)  # the scales' features side by side

    tinychat = tinychat_weights(llm_dir)
    if tinychat:  # an official *-AWQ build: converted (not re-quantized) at export
        llm.quantization = {"quant_method": "awq", "bits": 4, "version": TINYCHAT, "file": tinychat.name,
                            "note": "converted to AutoAWQ GEMM by export, or by edge-vila convert-awq"}
    else:
        _check_weights(llm_dir)
    _check_weights(vt_dir)
    shapes = _safetensors_shapes(pj_dir)
    for key, shape in projector.expected_shapes().items():
        if shape is None:
            continue
        if key not in shapes:
            raise CheckpointError(f"{pj_dir}: projector weight '{key}' missing for mm_projector_type {kind}")
        if tuple(shapes[key]) != shape:
            raise CheckpointError(
                f"{pj_dir}: '{key}' has shape {list(shapes[key])}, expected {list(shape)} "
                f"(vision hidden {vision.hidden_size} -> LLM hidden {llm.hidden_size})")
    template, source = _template(top, root)
    cfg = VilaConfig(root=root, llm_dir=llm_dir, llm=llm, chat_template=template, template_source=source,
                     vision_dir=vt_dir, vision=vision, projector_dir=pj_dir, projector=projector,
                     select_layer=select_layer, select_feature=feature, preprocess=pre, raw=top)
    cfg.image_tokens = ImageTokens.from_config(top, cfg.tokens_per_image, mode)  # validates the token grid
    frames = top.get("num_video_frames", 8)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise CheckpointError(f"{src}: key 'num_video_frames' should be a positive integer, got {frames!r}")
    cfg.num_video_frames = frames
    return cfg


TINYCHAT = "tinychat-v2"  # llm.quantization["version"] of an official AWQ build


def tinychat_weights(llm_dir: Path) -> Path | None:
    """The TinyChat state dict (*.pt) of an official *-AWQ build's llm/, which ships no safetensors."""
    pts = sorted(Path(llm_dir).glob("*.pt"))
    return pts[0] if pts and not any(Path(llm_dir).glob("*.safetensors")) else None


def _template(top: dict, root: Path) -> tuple[str | None, str]:
    """The checkpoint's chat template: config.json's own field, else the one VILA picks
    from the model's name (released VILA1.5 configs carry none: VILA chooses vicuna_v1 /
    llama_3 / hermes-2 by name), else None (the tokenizer decides at load)."""
    if top.get("chat_template"):
        return top["chat_template"], "config.json chat_template"
    for name in (top.get("_name_or_path"), root.resolve().name):
        if (t := template_for_name(name)) is not None:
            return t, f"VILA's conversation mode for the model name {name!r}"
    return None, ""


def _check_weights(folder: Path) -> None:
    if not any(folder.glob("*.safetensors")):
        bins = list(folder.glob("*.bin")) + list(folder.glob("*.pt"))
        hint = " (found pickle weights; convert them to safetensors: edge-vila never unpickles)" if bins else ""
        raise CheckpointError(f"{folder}: no *.safetensors weights found{hint}")
