"""Where TensorRT engines live in a bundle, what they were built for, and their shape profiles.

An engine is only valid for the TensorRT version, GPU architecture and JetPack it was
built with, and for the exact ONNX it came from. So engines sit in
`engines/trt<version>-sm<XY>-jp<jetpack>/` with an `engine_key.json` recording all of
that plus the sha256 of the ONNX files; the backend refuses a key that does not match
this device and says how to rebuild. Pure Python: the builder (export/trt_build.py) and
the backend (backends/tensorrt.py) both use it, and the tests check it here.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_vila.bundle import Manifest
from edge_vila.errors import CheckpointError

KEY_FILE = "engine_key.json"
LLM_PLAN = "llm.plan"
VISION_PLAN = "vision.plan"
PROJECTOR_PLAN = "projector.plan"  # dynamic_s2 bundles only
TIMING_CACHE = "timing.cache"


class EngineMismatch(CheckpointError):
    """Engines built for another TensorRT / GPU / JetPack / bundle."""


@dataclass(frozen=True)
class EngineKey:
    tensorrt: str          # full version, e.g. '10.3.0'
    sm: str                # 'sm87' on every Orin
    jetpack: str | None    # '6.1'; None on a non-Jetson GPU
    onnx_sha256: dict      # {'llm.onnx': ..., 'vision.onnx': ...} from the manifest
    precision: str = "auto"
    max_context: int = 2048
    max_prefill: int = 1024
    max_images: int = 1
    strongly_typed: bool = False
    plan_sha256: dict = field(default_factory=dict)  # each built .plan -> its sha256, checked before use

    def dirname(self) -> str:
        return f"trt{self.tensorrt}-{self.sm}-jp{self.jetpack or 'none'}"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict, path: Path) -> "EngineKey":
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except TypeError as e:
            raise EngineMismatch(f"{path}: not an engine key ({e})") from None


def engine_dir(bundle: Path, key: EngineKey) -> Path:
    return Path(bundle) / "engines" / key.dirname()


def write_key(folder: Path, key: EngineKey) -> EngineKey:
    """The folder's record, written after its plans: the key plus each plan's sha256."""
    from dataclasses import replace

    from edge_vila.fsutil import atomic_write_json, sha256_file

    key = replace(key, plan_sha256={p.name: sha256_file(p) for p in sorted(Path(folder).glob("*.plan"))})
    atomic_write_json(folder / KEY_FILE, key.to_json())
    return key


def compatibility_problems(built: EngineKey, here: EngineKey) -> list[str]:
    """Why engines built as `built` cannot run as `here` (empty list: they can)."""
    out = []
    if built.tensorrt != here.tensorrt:
        out.append(f"built with TensorRT {built.tensorrt}, this device has {here.tensorrt}")
    if built.sm != here.sm:
        out.append(f"built for {built.sm}, this GPU is {here.sm}")
    if built.jetpack != here.jetpack:
        out.append(f"built on JetPack {built.jetpack}, this device runs {here.jetpack}")
    for name, digest in here.onnx_sha256.items():
        if built.onnx_sha256.get(name) != digest:
            out.append(f"{name} changed since the engines were built")
    return out


def check_engines(folder: Path, here: EngineKey) -> EngineKey:
    """Read `folder`'s key and refuse it with one clear message when it does not match."""
    path = Path(folder) / KEY_FILE
    if not path.is_file():
        raise EngineMismatch(f"{path}: missing; build engines with `edge-vila build {folder.parent.parent}`")
    try:
        built = EngineKey.from_json(json.loads(path.read_text()), path)
    except json.JSONDecodeError as e:
        raise EngineMismatch(f"{path}: not valid JSON ({e})") from None
    problems = compatibility_problems(built, here)
    if problems:
        raise EngineMismatch(f"{folder}: engines do not match this device: {'; '.join(problems)}. "
                             f"Rebuild with `edge-vila build {folder.parent.parent} --rebuild`")
    for plan in (LLM_PLAN,) + ((VISION_PLAN,) if "vision.onnx" in here.onnx_sha256 else ()):
        if not (Path(folder) / plan).is_file():
            raise EngineMismatch(f"{Path(folder) / plan}: missing; rebuild with `edge-vila build --rebuild`")
        if plan not in built.plan_sha256:
            raise EngineMismatch(f"{path}: no sha256 recorded for {plan} (an older or interrupted build); "
                                 "rebuild with `edge-vila build --rebuild`")
    from edge_vila.fsutil import sha256_file

    for plan, digest in built.plan_sha256.items():
        f = Path(folder) / plan
        if not f.is_file() or sha256_file(f) != digest:
            raise EngineMismatch(f"{f}: changed or missing since it was built (sha256 mismatch); rebuild with "
                                 "`edge-vila build --rebuild`")
    return built


def find_engines(bundle: Path) -> list[Path]:
    return sorted(p for p in (Path(bundle) / "engines").glob("trt*") if p.is_dir())


def select_engines(bundle: Path, here: EngineKey) -> tuple[Path, EngineKey]:
    """The engine folder for this device, checked; a clear error naming what exists instead."""
    folder = engine_dir(bundle, here)
    if folder.is_dir():
        return folder, check_engines(folder, here)
    others = [p.name for p in find_engines(bundle)]
    hint = f" (found engines for {', '.join(others)}: built on another device or TensorRT version)" if others else ""
    raise EngineMismatch(f"{folder}: no engines for this device{hint}; build them here with "
                         f"`edge-vila build {bundle}`")


@dataclass
class Profile:
    """One optimization profile: input name -> (min, opt, max) shapes."""
    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def validate(self) -> None:
        for inp, (lo, opt, hi) in self.shapes.items():
            if not (len(lo) == len(opt) == len(hi)) or any(not a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise ValueError(f"profile {self.name}: {inp} needs min <= opt <= max, got {lo} {opt} {hi}")


def llm_profiles(man: Manifest, max_context: int, max_prefill: int) -> list[Profile]:
    """Two profiles over one engine: prefill (many new tokens) and decode (one token).

    Index 0 is prefill, 1 is decode: the backend switches with
    `set_optimization_profile_async`. The past length of decode starts at 1.
    """
    m = man.model
    if max_context > m.max_context:
        raise ValueError(f"max_context {max_context} exceeds the bundle's exported {m.max_context}")
    if not 1 <= max_prefill <= max_context:
        raise ValueError(f"max_prefill must be in 1..{max_context}, got {max_prefill}")
    D, kv, hd = m.hidden_size, m.num_kv_heads, m.head_dim
    ins = man.io["llm"]["inputs"]
    past_names = ins[2:]

    def build(name, seq, past) -> Profile:
        p = Profile(name, {ins[0]: tuple((1, s, D) for s in seq), ins[1]: tuple((s,) for s in seq)})
        for pn in past_names:
            p.shapes[pn] = tuple((1, kv, n, hd) for n in past)
        p.validate()
        return p

    from .memory import image_positions

    opt_prefill = min(max_prefill, max(1, image_positions(man) + 64))
    prefill = build("prefill", (1, opt_prefill, max_prefill), (0, 0, max_context - 1))
    decode = build("decode", (1, 1, 1), (1, max(1, max_context // 2), max_context - 1))
    return [prefill, decode]


def vision_batch(man: Manifest, max_images: int) -> int:
    """Vision inputs per engine call: every tile (and thumbnail) of max_images images."""
    from edge_vila.config import PreprocessSpec

    pre = man.preprocess
    return max_images * (PreprocessSpec(**pre).max_inputs_per_image if pre else 1)


def vision_profile(man: Manifest, max_images: int) -> Profile:
    pre = man.preprocess
    if not pre:
        raise ValueError("text-only bundle: no vision engine to build")
    hw = (pre["height"], pre["width"])
    p = Profile("vision", {"pixels": tuple((n, 3, *hw) for n in (1, 1, vision_batch(man, max_images)))})
    p.validate()
    return p


def projector_profile(man: Manifest, max_images: int) -> Profile:
    """dynamic_s2's projector.onnx: blocks of merged features, at most max_tiles per image."""
    from edge_vila.config import PreprocessSpec

    pre, v = man.preprocess, man.vision_dims or {}
    if not pre or not PreprocessSpec(**pre).s2:
        raise ValueError("only a dynamic_s2 bundle has a projector engine")
    shape = (v["patches"], v["projector_channels"])
    top = max(max_images, max_images * PreprocessSpec(**pre).max_tiles)
    p = Profile("projector", {"image_features": tuple((n, *shape) for n in (1, top // max_images, top))})
    p.validate()
    return p


__all__ = ["EngineKey", "EngineMismatch", "Profile", "engine_dir", "write_key", "check_engines",
           "compatibility_problems", "find_engines", "select_engines", "llm_profiles", "vision_batch", "vision_profile",
           "projector_profile", "PROJECTOR_PLAN",
           "KEY_FILE", "LLM_PLAN", "VISION_PLAN", "TIMING_CACHE"]
