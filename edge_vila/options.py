"""Runtime choices as one validated object: `RuntimeOptions` travels from the API, the CLI
(one argument group for every verb that loads a model), the server and the demo to the
backend, and is checked once, here, with one line naming the field."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from .errors import InputError

DEFAULT_CONTEXT = 2048  # positions export writes into a bundle and a checkpoint allocates by default
DEFAULT_MAX_PIXELS = 64_000_000  # a 64 MP photo is ~190 MB of RGB; a PNG claiming 60000^2 would be 10 GB

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
CHOICES = {
    "backend": BACKENDS,
    "dtype": ("float32", "bfloat16", "float16"),
    "variant": ("auto", "fast", "bundle"),
    "kv_cache": ("auto", "int8", "fp32"),
    "attention": ("auto", "edge", "gqa"),
    "matmul": ("auto", "edge", "nbits"),
    "lm_head": ("auto", "int8", "float"),
    "vision_int8": ("auto", "u8", "u8u8", "edge", "s8"),
}


@dataclass(frozen=True)
class RuntimeOptions:
    """How a model is run. Defaults are what a user gets with no flags.

    backend: auto (TensorRT where engines are built in the bundle, else ONNX Runtime for a
      bundle, torch for a checkpoint), torch, onnxruntime or tensorrt.
    max_context: LLM positions to allocate (default: the bundle's exported context, or
      min(model, 2048) for a checkpoint).
    dtype: the torch backend's compute dtype. threads: CPU threads (default: all cores).
    exact: ORT without int8 activations (MatMulNBits accuracy level 0) and an FP32 KV cache:
      for parity checks.
    variant: ORT on the CPU runs the fast graph derived from an INT4 bundle (auto/fast) or
      the bundle's own graph (bundle).
    kv_cache: the fast graph's KV cache, INT8 unless exact (auto), int8 or fp32.
    attention: over the INT8 cache, our op (edge) or ORT's GroupQueryAttention (gqa).
      matmul: the INT4 linears, our op (edge) or ORT's MatMulNBits (nbits); never ours with
      exact. auto (both): whichever pair measured faster on this machine at this model's
      decode shapes (timed once, recorded: backends/op_choice.py), where a C compiler builds ours.
    lm_head: a bundle's float output head in the fast graph: int8 (8-bit weights per block of
      32, MatMulNBits: a quarter of fp32's bytes per token) or float; auto: int8 unless exact.
      A head the bundle already has in INT4 (`quantize --quantize-lm-head`) stays INT4.
    vision_int8: how ORT on the CPU runs the INT8 ViT: u8 (U8 activations x S8 weights, its
      fast path), u8u8 (uint8 weights with zero point 128, derived once and cached: x86 CPUs
      without VNNI sum u8 x s8 pairs into saturating int16), edge (our Int8Linear op: 7-bit
      activations per token, nothing saturates; derived and cached likewise), s8 (the bundle's
      S8 form as is: accurate, slow); auto: on x86 without VNNI edge where AVX2 and a C
      compiler are there, else u8u8; elsewhere u8; exact: s8.
    max_tiles: caps NVILA-Lite's dynamic tiling (and NVILA-8B's last S2 scale, >= 9).
    max_pixels: images whose header claims more pixels are refused before decoding.
    """
    backend: str = "auto"
    max_context: int | None = None
    dtype: str = "float32"
    threads: int | None = None
    exact: bool = False
    variant: str = "auto"
    kv_cache: str = "auto"
    attention: str = "auto"
    matmul: str = "auto"
    lm_head: str = "auto"
    vision_int8: str = "auto"
    max_tiles: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            v = getattr(self, name)
            if v not in allowed:
                raise InputError(f"{name} {v!r} unknown (expected one of {', '.join(allowed)})")
        for name, low in (("max_context", 2), ("threads", 1), ("max_tiles", 1), ("max_pixels", 1)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise InputError(f"{name} must be an integer >= {low}, got {v!r}")
        if not isinstance(self.exact, bool):
            raise InputError(f"exact must be true or false, got {self.exact!r}")
        if self.matmul == "edge" and self.exact:
            raise InputError("matmul='edge' quantizes activations to int8 per block; exact=True keeps MatMulNBits")
        if self.lm_head == "int8" and self.exact:
            raise InputError("lm_head='int8' rounds the output head's weights; exact=True keeps it float")

    def replace(self, **changes) -> "RuntimeOptions":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InputError(f"unknown runtime option(s) {', '.join(sorted(unknown))} "
                             f"(expected {', '.join(f.name for f in dataclasses.fields(self))})")
        return dataclasses.replace(self, **changes)

    @property
    def wants_bundle_features(self) -> bool:
        """Asks for what only an ORT bundle on the CPU has (the INT8 KV cache, our ops, the INT8 head)."""
        return self.kv_cache == "int8" or "edge" in (self.attention, self.matmul) or self.lm_head == "int8"

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "RuntimeOptions":
        """From the CLI's runtime argument group (`add_runtime_args`)."""
        given = {f.name: getattr(a, f.name) for f in dataclasses.fields(cls) if getattr(a, f.name, None) is not None}
        return cls(**given)


def add_runtime_args(s: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The runtime argument group of every verb that loads a model (run, chat, bench,
    camera, serve, demo, build): each flag is one RuntimeOptions field (`skip`: fields a verb
    sets otherwise)."""
    g = _Group(s.add_argument_group("runtime"), skip)
    g.add_argument("--backend", default=None, choices=BACKENDS,
                   help="runtime: auto (TensorRT where engines are built, else ONNX Runtime for a bundle, torch "
                        "for a checkpoint), onnxruntime, tensorrt or torch")
    g.add_argument("--max-context", type=int, default=None,
                   help=f"LLM positions to allocate (prompt + images + answer; default: the bundle's exported "
                        f"context, {DEFAULT_CONTEXT} for a checkpoint)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--exact", action="store_true", default=None,
                   help="ONNX Runtime without int8 activations and with an FP32 KV cache (parity checks)")
    g.add_argument("--variant", default=None, choices=CHOICES["variant"],
                   help="ONNX Runtime on the CPU: the fast graph derived from an INT4 bundle (auto, fast) or the "
                        "bundle's own graph (bundle)")
    g.add_argument("--kv-cache", default=None, choices=CHOICES["kv_cache"],
                   help="KV cache of the CPU fast graph (auto: INT8)")
    g.add_argument("--attention", default=None, choices=CHOICES["attention"],
                   help="attention over the INT8 cache: our op (edge) or ORT's gqa (auto: see --matmul)")
    g.add_argument("--matmul", default=None, choices=CHOICES["matmul"],
                   help="INT4 linears: our op (edge) or ORT's MatMulNBits (nbits); auto: the pair of attention "
                        "and matmul that measured faster on this machine (timed once)")
    g.add_argument("--lm-head", default=None, choices=CHOICES["lm_head"],
                   help="a float output head in the CPU fast graph: int8 weights (a quarter of the bytes per "
                        "token) or float (auto: int8 unless --exact)")
    g.add_argument("--vision-int8", default=None, choices=CHOICES["vision_int8"],
                   help="INT8 ViT on the CPU: u8, u8u8 (uint8 weights: no int16 saturation on x86 without VNNI), "
                        "edge (our Int8Linear op: 7-bit activations per token), s8 (accurate, slow); "
                        "auto: edge (else u8u8) on x86 where VNNI is missing")
    g.add_argument("--max-tiles", type=int, default=None,
                   help="NVILA-Lite: cut a lone image into at most N tiles; NVILA-8B: at most N blocks of its "
                        "last S2 scale, N >= 9 (default: the checkpoint's, 12); fewer tiles, faster answers")
    g.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images whose header claims more pixels than this, before decoding them "
                        f"(default: {DEFAULT_MAX_PIXELS})")


class _Group:
    """An argument group that leaves out the flags of skipped fields."""

    def __init__(self, group, skip: tuple[str, ...]):
        self.group, self.skip = group, skip

    def add_argument(self, flag: str, **kw) -> None:
        if flag.lstrip("-").replace("-", "_") not in self.skip:
            self.group.add_argument(flag, **kw)


__all__ = ["RuntimeOptions", "add_runtime_args", "DEFAULT_CONTEXT", "DEFAULT_MAX_PIXELS"]
