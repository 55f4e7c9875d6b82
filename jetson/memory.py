"""Will this bundle fit this Orin? A memory budget computed before anything is loaded.

Jetson memory is unified: the CPU's embedding table, the engines' weights, the KV cache,
activations and the CUDA/TensorRT runtime all come out of the same LPDDR5. The budget
adds them up from the model's dimensions and compares with what a board leaves to
applications, then proposes the largest context (and image count) that does fit.

The two constants below are estimates, not measurements on hardware (none here):
the OS share of a headless JetPack 6 image and the CUDA context + TensorRT/cuBLAS
libraries with CUDA lazy loading. Override them when you have measured your board.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_vila.bundle import Manifest
from edge_vila.config import ImageTokens, PreprocessSpec, ProjectorSpec

GiB = 1024 ** 3
MiB = 1024 ** 2
BOARD_RAM_GB = {"orin-nano-4gb": 4, "orin-nano-8gb": 8, "orin-nx-8gb": 8, "orin-nx-16gb": 16,
                "agx-orin-32gb": 32, "agx-orin-64gb": 64}
OS_RESERVE_GB = 1.2        # headless L4T 36.x with its services (estimate)
RUNTIME_OVERHEAD_GB = 0.6  # CUDA context + TensorRT/cuBLAS with CUDA_MODULE_LOADING=LAZY (estimate)
USABLE_FRACTION = 0.95     # the kernel reports ~5% less than the nominal size (carveouts)


@dataclass
class ModelDims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool = False
    # vision tower (0 layers = text-only)
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_layers: int = 0
    vision_heads: int = 0
    vision_patches: int = 0       # tokens inside the ViT per image
    tokens_per_image: int = 0     # embeddings per vision input (after the projector)
    patch_size: int = 14
    projector_in: int = 0         # input width of the projector (4*vision_hidden for mlp_downsample)
    projector_mid: int = 0        # the 3x3 projector's middle width (3*vision_hidden); 0: none
    positions_per_image: int = 0  # LLM positions of one image at most (tiles, thumbnail, newlines)
    inputs_per_image: int = 1     # vision-tower inputs of one image at most (dynamic: tiles + thumbnail)

    def llm_linear_params(self) -> int:
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        return self.layers * (q + kv + o + 3 * self.hidden * self.intermediate)

    def vision_params(self) -> int:
        h, i = self.vision_hidden, self.vision_intermediate
        per_layer = 4 * h * h + 2 * h * i
        return self.vision_layers * per_layer + 3 * self.patch_size ** 2 * h + self.vision_patches * h

    def projector_params(self) -> int:
        if not self.vision_layers:
            return 0
        mid = self.projector_mid
        return self.projector_in * (mid or self.hidden) + mid * self.hidden + self.hidden * self.hidden

    @property
    def image_positions(self) -> int:
        return self.positions_per_image or self.tokens_per_image

    @classmethod
    def vila15_3b(cls) -> "ModelDims":
        """VILA1.5-3B: Sheared-LLaMA-2.7B + SigLIP-so400m/14@384 + mlp_downsample (2x2 fold)."""
        return cls(hidden=2560, intermediate=6912, layers=32, heads=20, kv_heads=20, head_dim=128, vocab=32000,
                   vision_hidden=1152, vision_intermediate=4304, vision_layers=27, vision_heads=16,
                   vision_patches=729, tokens_per_image=196, projector_in=4 * 1152, positions_per_image=196)

    @classmethod
    def from_layout(cls, name: str) -> "ModelDims":
        """A released checkpoint's dims from its recorded config (edge_vila.released): the
        fixed grid of VILA1.5 (`resize`), NVILA-Lite's `dynamic` tiling and NVILA's
        `dynamic_s2` at their most tiles."""
        from edge_vila.config import PROJECTOR_FOLD
        from edge_vila.released import get_layout

        try:
            lay = get_layout(name)
        except KeyError as e:
            raise ValueError(str(e).strip("'\"")) from None
        mode = lay.top.get("image_aspect_ratio")
        if mode not in ("resize", "pad", "dynamic", "dynamic_s2") or lay.projector_type not in PROJECTOR_FOLD:
            raise ValueError(f"{lay.name}: tokens per image depend on its {mode} tiling, which the budget does "
                             f"not model yet; budget its exported bundle instead")
        m, v, k = lay.llm, lay.vision, PROJECTOR_FOLD[lay.projector_type]
        side = v["image_size"] // v["patch_size"]
        heads = m["num_attention_heads"]
        per_tile = ProjectorSpec(lay.projector_type, v["hidden_size"], m["hidden_size"]).num_tokens(side * side)
        scales = [int(x) for x in str(lay.top.get("s2_scales")).split(",")] if mode == "dynamic_s2" else []
        pre = PreprocessSpec(v["image_size"], v["image_size"], [0.5] * 3, [0.5] * 3, mode=mode, s2_scales=scales,
                             max_tiles=lay.top.get("max_tiles", 12) if mode in ("dynamic", "dynamic_s2") else 1)
        tiles = pre.max_inputs_per_image
        feat = v["hidden_size"] * max(1, len(scales))  # dynamic_s2: the scales' features side by side
        return cls(hidden=m["hidden_size"], intermediate=m["intermediate_size"], layers=m["num_hidden_layers"],
                   heads=heads, kv_heads=m.get("num_key_value_heads", heads), head_dim=m["hidden_size"] // heads,
                   vocab=m["vocab_size"], tie_embeddings=bool(m.get("tie_word_embeddings", False)),
                   vision_hidden=v["hidden_size"], vision_intermediate=v["intermediate_size"],
                   vision_layers=v["num_hidden_layers"], vision_heads=v["num_attention_heads"],
                   vision_patches=side * side, tokens_per_image=per_tile, patch_size=v["patch_size"],
                   projector_in=k * k * feat, projector_mid=3 * feat if k == 3 else 0,
                   positions_per_image=ImageTokens.from_config(lay.top, per_tile, mode).max_positions(pre),
                   inputs_per_image=tiles)

    @classmethod
    def from_manifest(cls, man: Manifest) -> "ModelDims":
        m = man.model
        v = man.vision_dims or {}
        pre = man.preprocess
        return cls(hidden=m.hidden_size, intermediate=m.intermediate_size, layers=m.num_layers,
                   heads=m.num_heads, kv_heads=m.num_kv_heads, head_dim=m.head_dim, vocab=m.vocab_size,
                   tie_embeddings=m.tie_word_embeddings,
                   vision_hidden=v.get("hidden_size", 0), vision_intermediate=v.get("intermediate_size", 0),
                   vision_layers=v.get("num_layers", 0), vision_heads=v.get("num_heads", 0),
                   vision_patches=v.get("patches", 0), tokens_per_image=man.tokens_per_image,
                   patch_size=v.get("patch_size", 14), projector_in=v.get("projector_in", 0),
                   projector_mid=v.get("projector_mid", 0), positions_per_image=image_positions(man),
                   inputs_per_image=PreprocessSpec(**pre).max_inputs_per_image if pre else 1)


def image_positions(man: Manifest) -> int:
    """A bundle's LLM positions per image at most (older bundles: tokens_per_image)."""
    it, pre = man.image_tokens, man.preprocess
    if not it or not pre:
        return man.tokens_per_image
    return ImageTokens(**it).max_positions(PreprocessSpec(**pre))


@dataclass
class BudgetOptions:
    max_context: int = 4096
    max_images: int = 1
    llm_weight_bits: int = 4
    group_size: int = 128
    lm_head_bits: int = 16
    vision_weight_bits: int = 8
    kv_bytes: int = 2          # the bundle's KV I/O is float16 (export --kv-dtype fp16, the default)
    kv_buffers: int = 2        # TensorRT backend ping-pongs past/present buffers
    act_bytes: int = 2         # fp16 activations inside the engines
    embed_bytes: int = 2       # embed.safetensors is float16, held by the host process
    workspace_mb: int = 512
    os_reserve_gb: float = OS_RESERVE_GB
    runtime_overhead_gb: float = RUNTIME_OVERHEAD_GB


@dataclass
class Budget:
    parts: dict[str, int]
    total: int
    board: str
    available: int
    options: dict = field(default_factory=dict)
    suggestion: str | None = None

    @property
    def fits(self) -> bool:
        return self.total <= self.available

    def table(self) -> str:
        rows = [f"{k:<22}{v / GiB:8.2f} GiB" for k, v in self.parts.items()]
        rows.append(f"{'total':<22}{self.total / GiB:8.2f} GiB")
        rows.append(f"{self.board + ' leaves':<22}{self.available / GiB:8.2f} GiB -> "
                    f"{'fits' if self.fits else 'DOES NOT FIT'}")
        if self.suggestion:
            rows.append(self.suggestion)
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"parts": self.parts, "total": self.total, "board": self.board, "available": self.available,
                "fits": self.fits, "suggestion": self.suggestion, "options": self.options}


def bundle_byte_widths(root: Path, man: Manifest) -> dict[str, int]:
    """kv_bytes / embed_bytes as this bundle stores them: its manifest's KV dtype (a bundle
    without one is float32) and its embedding table's dtype."""
    from edge_vila.config import safetensors_header

    out = {"kv_bytes": 2 if (man.io.get("llm") or {}).get("kv_dtype", "float32") == "float16" else 4}
    embed = Path(root) / "embed.safetensors"
    if embed.is_file():
        dtype = safetensors_header(embed)[1].get("embed_tokens", {}).get("dtype", "F32")
        out["embed_bytes"] = {"F16": 2, "BF16": 2, "F32": 4}.get(dtype, 4)
    return out


def available_bytes(board: str, o: BudgetOptions) -> int:
    if board not in BOARD_RAM_GB:
        raise ValueError(f"board {board!r} unknown (expected one of {', '.join(BOARD_RAM_GB)})")
    return int((BOARD_RAM_GB[board] * USABLE_FRACTION - o.os_reserve_gb - o.runtime_overhead_gb) * GiB)


def kv_cache_bytes(d: ModelDims, o: BudgetOptions) -> int:
    return 2 * d.layers * d.kv_heads * d.head_dim * o.max_context * o.kv_bytes * o.kv_buffers


def parts(d: ModelDims, o: BudgetOptions) -> dict[str, int]:
    lin = d.llm_linear_params()
    groups = lin // o.group_size
    # INT4: packed weights + one fp16 scale per group + the zero-point correction (one fp16 per group)
    llm_w = lin * o.llm_weight_bits // 8 + (4 * groups if o.llm_weight_bits < 16 else 0)
    # a tied head (Qwen2-1.5B) still costs its own copy: the engine holds it, the host table is separate
    head = d.vocab * d.hidden * o.lm_head_bits // 8
    out = {"llm_weights": llm_w + 2 * d.layers * d.hidden * 2, "lm_head": head,
           "embed_table_host": d.vocab * d.hidden * o.embed_bytes, "kv_cache": kv_cache_bytes(d, o)}
    # prefill peak: residual + norms + q/k/v/o, the MLP's gate/up/act, and one layer's scores
    prefill = o.max_images * d.image_positions + 256 if d.vision_layers else o.max_context
    prefill = min(prefill, o.max_context)
    llm_act = (prefill * (6 * d.hidden + 3 * d.intermediate) + d.heads * prefill * o.max_context) * o.act_bytes
    out["llm_activations"] = llm_act
    if d.vision_layers:
        out["vision_weights"] = d.vision_params() * o.vision_weight_bits // 8 + d.projector_params() * 2
        n, s = o.max_images * d.inputs_per_image, d.vision_patches
        out["vision_activations"] = n * (s * (6 * d.vision_hidden + 2 * d.vision_intermediate)
                                         + d.vision_heads * s * s) * o.act_bytes
    out["workspace"] = o.workspace_mb * MiB
    return out


def budget(d: ModelDims, board: str, o: BudgetOptions | None = None) -> Budget:
    o = o or BudgetOptions()
    p = parts(d, o)
    b = Budget(parts=p, total=sum(p.values()), board=board, available=available_bytes(board, o), options=asdict(o))
    if not b.fits:
        b.suggestion = suggest(d, board, o)
    return b


def suggest(d: ModelDims, board: str, o: BudgetOptions) -> str:
    """The largest context (multiple of 256) that fits, then fewer images, else a bigger board."""
    avail = available_bytes(board, o)
    for images in range(o.max_images, 0, -1):
        for ctx in range(o.max_context - 256, 255, -256):
            t = BudgetOptions(**{**asdict(o), "max_context": ctx, "max_images": images})
            if sum(parts(d, t).values()) <= avail:
                what = f"--max-context {ctx}" + (f" --max-images {images}" if images != o.max_images else "")
                return f"suggestion: build with {what} to fit {board}"
    # the smallest bigger board that holds it as asked (not merely the next one up)
    bigger = [b for b, gb in sorted(BOARD_RAM_GB.items(), key=lambda kv: kv[1])
              if gb > BOARD_RAM_GB[board] and sum(parts(d, o).values()) <= available_bytes(b, o)]
    return "suggestion: this model does not fit " + board + (f" at any context; try {bigger[0]}" if bigger else "")


__all__ = ["ModelDims", "BudgetOptions", "Budget", "budget", "parts", "kv_cache_bytes", "available_bytes",
           "bundle_byte_widths", "image_positions",
           "BOARD_RAM_GB", "suggest"]
