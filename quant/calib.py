"""Calibration and held-out data, all local (nothing is downloaded).

- Calibration text: docstrings of a fixed list of Python standard-library modules
  (English prose about software, present on every machine with Python).
- Held-out text: the license texts Debian/Ubuntu (and so JetPack) ship in
  /usr/share/common-licenses — fixed, English, disjoint from the calibration domain.
- Multimodal calibration: synthetic-world images with questions pushed through the real
  vision tower and projector, so image-token activations shape the AWQ scales.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CALIB_MODULES = ("argparse", "collections", "json", "logging", "pathlib", "subprocess", "threading", "asyncio",
                 "email.message", "http.client", "unittest", "datetime", "decimal", "fractions", "functools",
                 "itertools", "shutil", "tarfile", "zipfile", "csv", "sqlite3", "textwrap", "string", "heapq",
                 "random", "statistics", "typing", "dataclasses", "contextlib", "enum", "socket", "ssl",
                 "urllib.request", "xml.etree.ElementTree", "configparser", "difflib", "pdb", "pickle", "codecs")
HELDOUT_LICENSES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3")
LICENSE_DIR = Path("/usr/share/common-licenses")


def calibration_text() -> str:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated attributes (typing.io, ...) warn when touched
        return _calibration_text()


def _calibration_text() -> str:
    docs = []
    for name in CALIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for obj in [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)) else None
            if doc and len(doc) > 200:
                docs.append(doc)
    seen, out = set(), []
    for d in docs:  # re-exported objects repeat their docstrings
        if d not in seen:
            seen.add(d)
            out.append(d)
    return "\n\n".join(out)


def heldout_text(min_chars: int = 60_000) -> str:
    parts = []
    for name in HELDOUT_LICENSES:
        p = LICENSE_DIR / name
        if p.is_file():
            parts.append(p.read_text(encoding="utf-8", errors="replace"))
    text = "\n\n".join(parts)
    if len(text) < min_chars:
        raise FileNotFoundError(f"held-out text: expected {', '.join(HELDOUT_LICENSES)} in {LICENSE_DIR}")
    return text


def text_blocks(tok, text: str, n: int, seq_len: int, bos: int | None) -> torch.Tensor:
    """n blocks of seq_len token ids (BOS first when the tokenizer has one)."""
    ids = tok.encode(text)
    step = seq_len - (1 if bos is not None else 0)
    blocks = []
    for i in range(n):
        chunk = ids[i * step:(i + 1) * step]
        if len(chunk) < step:
            break
        blocks.append(([bos] if bos is not None else []) + chunk)
    if not blocks:
        raise ValueError(f"calibration text too short for blocks of {seq_len} tokens")
    return torch.tensor(blocks)


@torch.no_grad()
def calibration_embeds(lm, tok, n_text: int, seq_len: int, vlm_parts=None, n_mm: int = 0,
                       image_size: int = 64, pre=None, device: torch.device | str = "cpu") -> torch.Tensor:
    """[N, seq_len, D] input embeddings (on the host): text blocks, plus (for a VLM) blocks
    that start with projected image tokens (the vision tower run on `device`) followed by a
    question and calibration text."""
    emb = lm.model.embed_tokens
    text = calibration_text()
    out = [emb(text_blocks(tok, text, n_text, seq_len, tok.bos_id))]
    if vlm_parts is not None and n_mm:
        from edge_vila.preprocess import preprocess_images
        from edge_vila.synthetic import world

        vision, projector = (m.to(device) for m in vlm_parts)
        rng = world.rng_for(4242)
        ids = tok.encode(text)
        from edge_vila.progress import tqdm

        rows = []
        for i in tqdm(range(n_mm), desc="calibration images (vision tower)", unit="block"):
            qa = world.make_question(rng)
            pix = torch.from_numpy(preprocess_images([s.render(image_size) for s in qa.scenes], pre))
            feats = vision(pix.to(device))
            if pre is not None and pre.s2:  # untiled (VILA's block size None): features repeated per scale
                feats = feats.repeat(1, 1, len(pre.s2_scales))
            img = projector(feats).reshape(-1, lm.spec.hidden_size).cpu()
            head = emb(torch.tensor(([tok.bos_id] if tok.bos_id is not None else [])))
            q = emb(torch.tensor(tok.encode(f"\n{qa.question} {qa.answer}\n")))
            fill = seq_len - len(head) - len(img) - len(q)
            if fill < 0:
                continue
            start = (i * 97) % max(1, len(ids) - fill)
            rows.append(torch.cat([head, img, q, emb(torch.tensor(ids[start:start + fill]))]))
        if rows:
            out.append(torch.stack(rows))
    return torch.cat(out)
