"""The CPU backend's private artifacts: the fast graph derived from the bundle's llm.onnx
(ort_fast.py), cached in `BUNDLE/engines/ort-cpu/<key>/` (or the user's cache dir when the
bundle is read-only), each folder with a `record.json` that says what it was built from and
the sha256 of every file in it.

`edge-vila build BUNDLE --target ort-cpu` makes them; a load whose cache is missing builds it
(and says so). Every load verifies a cached folder against its record first: a truncated,
overwritten or foreign file, or a record from other bundle files, is never used - the folder
is rebuilt, or, where it cannot be written, the user's cache dir is used instead.
Nothing here calibrates: the INT8 KV cache's scales come with the bundle (kv_scales.safetensors,
computed at export).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..bundle import BundleConfig, BundleError
from ..errors import InputError
from ..fsutil import atomic_write_json, cache_home, checked_sha256, sha256_file

log = logging.getLogger(__name__)

KV_SCALES_FILE = "kv_scales.safetensors"
KV_SCALES_KEY = "kv_scales"  # float32 [layers, 2 (key, value), kv_heads, head_dim]
RECORD = "record.json"
SOURCES = ("llm.onnx", "llm.onnx.data", KV_SCALES_FILE)  # the bundle files a fast graph is made from


@dataclass(frozen=True)
class FastGraphKey:
    """Which fast graph: MatMulNBits' accuracy level (0 exact, 4 int8 activations), an INT8
    KV cache or not, whose attention and INT4 linear ops run in it, and whether a float
    output head is rounded to 8-bit weights."""
    accuracy_level: int = 4
    kv8: bool = False
    attention: str = "gqa"  # gqa | edge
    matmul: str = "nbits"   # nbits | edge
    lm_head: str = "float"  # float | int8 (a head the bundle has in INT4 stays INT4 either way)
    # our Int4Linear's weight layout: 2 has float16 scales and no zeros when symmetric (1 had
    # float32 and zeros always); a graph of another layout is built again
    int4_layout: int = 2

    def folder_name(self, digest: str) -> str:
        return (f"{digest}-acc{self.accuracy_level}" + ("-kv8" if self.kv8 else "")
                + ("-edgeattn" if self.attention == "edge" else "") + ("-edgemm" if self.matmul == "edge" else "")
                + ("-head8" if self.lm_head == "int8" else ""))


def has_kv_scales(cfg: BundleConfig) -> bool:
    """Whether the bundle brings INT8 KV-cache scales (read_manifest checked the file is there)."""
    return KV_SCALES_FILE in cfg.manifest.files


def read_kv_scales(cfg: BundleConfig) -> np.ndarray | None:
    """The bundle's INT8 KV-cache scales, or None for a bundle exported without them."""
    if not has_kv_scales(cfg):
        return None
    from safetensors.numpy import load_file

    path = cfg.root / KV_SCALES_FILE
    m = cfg.llm
    want = (m.num_layers, 2, m.num_kv_heads, m.head_dim)
    try:
        scales = load_file(str(path))[KV_SCALES_KEY]
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds: one line naming the file
        raise BundleError(f"{path}: not a kv_scales file ({e})") from None
    if scales.shape != want or not np.isfinite(scales).all() or (scales <= 0).any():
        raise BundleError(f"{path}: '{KV_SCALES_KEY}' has shape {scales.shape}, expected {want} "
                          "of positive finite scales")
    return scales.astype(np.float32)


def _sources(cfg: BundleConfig, key: FastGraphKey) -> dict[str, str]:
    files = cfg.manifest.files
    names = [n for n in SOURCES if n in files and (key.kv8 or n != KV_SCALES_FILE)]
    return {n: files[n] for n in names}


def cache_folders(cfg: BundleConfig, name: str) -> list[Path]:
    """Where a derived artifact `name` may live: in the bundle, else the user's cache dir."""
    user = cache_home() / "ort-cpu" / name
    return [cfg.root / "engines" / "ort-cpu" / name, user]


def _folders(cfg: BundleConfig, key: FastGraphKey) -> list[Path]:
    src = _sources(cfg, key)
    return cache_folders(cfg, key.folder_name(hashlib.sha256("".join(src.values()).encode()).hexdigest()[:16]))


def find_verified(folders: list[Path], sources: dict[str, str], key, what: str) -> Path | None:
    """The first of `folders` that passes `verify`; each one that fails is logged, not used."""
    for folder in folders:
        if folder.is_dir():
            why = verify(folder, sources, key)
            if why is None:
                return folder
            log.warning("%s: not using this cached %s: %s", folder, what, why)
    return None


def build_where_writable(folders: list[Path], what: str, build_fn) -> Path:
    """`build_fn(folder)` into the first of `folders` that can be written (a read-only bundle
    or a full disk there: the user's cache dir next); a failed build leaves no folder behind."""
    for folder in folders:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(folder.parent, os.W_OK):
                raise PermissionError(folder.parent)
            return build_fn(folder)
        except OSError as e:
            shutil.rmtree(folder, ignore_errors=True)
            if folder == folders[-1]:
                raise
            log.info("cannot write the %s into %s (%s): using the user's cache dir", what, folder.parent,
                     e.strerror or e)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    raise AssertionError("no folders")


def write_record(folder: Path, kind: str, key, sources: dict[str, str], t0: float, **extra) -> None:
    """The folder's record.json, written last (a record means a finished build): what it was
    built from and the sha256 of every file in it."""
    from .. import __version__

    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != RECORD}
    atomic_write_json(folder / RECORD, {"kind": kind, "key": asdict(key), "sources": sources, "files": files,
                                        "edge_vila": __version__, **extra,
                                        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                        "built_unix": time.time(), "seconds": round(time.perf_counter() - t0, 1)})


def verify(folder: Path, sources: dict[str, str], key: FastGraphKey) -> str | None:
    """None when `folder` holds exactly what its record says, built from `sources` with
    `key`; else why not (one phrase, for the log)."""
    rec_path = folder / RECORD
    if not rec_path.is_file():
        return "no record.json (built by an older edge-vila, or interrupted)"
    try:
        rec = json.loads(rec_path.read_text())
        files, rec_sources, rec_key = dict(rec["files"]), dict(rec["sources"]), rec["key"]
    except (ValueError, KeyError, TypeError) as e:
        return f"record.json unreadable ({e})"
    if rec_sources != sources or rec_key != asdict(key):
        return "built from other bundle files or options"
    for name, digest in files.items():
        f = folder / name
        if not f.is_file():
            return f"{name} missing"
        if checked_sha256(f) != digest:
            return f"{name} changed since it was built (sha256 mismatch)"
    return None


def build(cfg: BundleConfig, key: FastGraphKey, folder: Path) -> Path:
    """Build the fast graph into `folder` (emptied first) and write its record last, so an
    interrupted build is never taken for a finished one."""
    from .ort_fast import build_fast_llm

    scales = None
    if key.kv8:
        scales = read_kv_scales(cfg)
        if scales is None:
            raise InputError(f"{cfg.root}: no {KV_SCALES_FILE} (exported by an older edge-vila): the INT8 KV "
                             "cache needs it; re-export the bundle")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    out = build_fast_llm(cfg.root / "llm.onnx", cfg.manifest, folder / "llm_fast.onnx", key.accuracy_level,
                         kv_scales=scales, attention=key.attention, matmul=key.matmul, lm_head=key.lm_head)
    write_record(folder, "ort-cpu fast graph", key, _sources(cfg, key), t0)
    return out


def fast_graph(cfg: BundleConfig, key: FastGraphKey, required: bool) -> Path | None:
    """The verified cached fast graph for `cfg` and `key`, built when missing or failing its
    record; None when it cannot be had and is not required."""
    sources = _sources(cfg, key)
    folders = _folders(cfg, key)
    found = find_verified(folders, sources, key, "fast graph")
    if found:
        return found / "llm_fast.onnx"
    try:
        import onnx  # noqa: F401 - the builder's; a verified cache needs only onnxruntime
    except ImportError as e:
        if required:
            raise InputError(f"building the fast CPU graph needs the onnx package ({e})") from None
        log.warning("%s: running the bundle graph (building the fast CPU graph needs onnx: %s)", cfg.root, e)
        return None

    def build_in(folder: Path) -> Path:
        log.info("building the fast CPU graph in %s (once per bundle; `edge-vila build --target ort-cpu` "
                 "does it ahead of time)", folder)
        return build(cfg, key, folder)

    try:
        return build_where_writable(folders, "fast CPU graph", build_in)
    except (ValueError, KeyError) as e:  # a graph this builder does not know: run the bundle's own
        if required:
            raise InputError(f"{cfg.root}: cannot build the fast CPU graph ({e})") from None
        log.warning("%s: running the bundle graph (fast CPU graph unavailable: %s)", cfg.root, e)
        return None


def build_cpu(path: str | Path, options, rebuild: bool = False) -> dict:
    """`edge-vila build --target ort-cpu`: make (or verify) what a CPU load of this bundle
    with `options` uses - the fast graph and our compiled ops - so the load only loads."""
    from ..bundle import load_bundle_config
    from .onnxruntime import OrtBackend

    cfg = load_bundle_config(path)
    if cfg.manifest.quant.get("llm") != "awq-w4":
        return {"target": "ort-cpu", "built": [], "note": "a float bundle runs its own llm.onnx: nothing to build"}
    if rebuild:
        shutil.rmtree(cfg.root / "engines" / "ort-cpu", ignore_errors=True)
    t0 = time.time()
    be = OrtBackend(cfg, options.replace(variant="fast"), providers=["CPUExecutionProvider"])
    key, folder = be.fast_key, be.fast_graph.parent  # the folder the load verified or built: not hashed again
    rec = json.loads((folder / RECORD).read_text())
    built = rec.get("built_unix", 0) >= t0
    return {"target": "ort-cpu", "folder": str(folder), "key": asdict(key), "kv_cache": be.kv_cache,
            "attention": be.attention, "matmul": be.matmul, "lm_head": be.lm_head, "built_now": built,
            "files": {n: os.path.getsize(folder / n) for n in rec["files"]}}
