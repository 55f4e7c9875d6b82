"""Loaders for real training data, so users can train on their own images.

- LLaVA JSON: a list of {"image": "rel/path.jpg" (or a list), "conversations":
  [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]}.
- MMC4 JSONL (interleaved documents): one JSON object a line with "text_list" and
  "image_info": [{"image_name": "...", "matched_text_index": i}, ...]; each image is
  placed before the sentence it is matched to.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..prompt import IMAGE_PLACEHOLDER


@dataclass
class RawSample:
    kind: str
    images: list[Path] = field(default_factory=list)
    text: str = ""
    turns: list[tuple[str, str]] = field(default_factory=list)


def _image(root: Path, name: str, src: str) -> Path:
    p = (root / name) if not Path(name).is_absolute() else Path(name)
    if not p.is_file():
        raise InputError(f"{src}: image {name!r} not found under {root}")
    return p


def load_llava_json(path: str | Path, image_root: str | Path | None = None) -> list[RawSample]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: LLaVA JSON file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of samples")
    root = Path(image_root) if image_root else path.parent
    out = []
    for n, item in enumerate(data):
        where = f"{path}[{n}]"
        conv = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(conv, list) or len(conv) < 2:
            raise InputError(f"{where}: 'conversations' must be a list of human/gpt turns")
        imgs = item.get("image") or []
        imgs = [imgs] if isinstance(imgs, str) else list(imgs)
        turns = []
        for k in range(0, len(conv) - 1, 2):
            h, g = conv[k], conv[k + 1]
            if h.get("from") != "human" or g.get("from") != "gpt":
                raise InputError(f"{where}.conversations[{k}]: expected a 'human' turn then a 'gpt' turn")
            turns.append((str(h.get("value", "")), str(g.get("value", ""))))
        marks = sum(u.count(IMAGE_PLACEHOLDER) for u, _ in turns)
        if imgs and marks == 0:
            turns[0] = ((IMAGE_PLACEHOLDER + "\n") * len(imgs) + turns[0][0], turns[0][1])
        elif marks != len(imgs):
            raise InputError(f"{where}: {marks} {IMAGE_PLACEHOLDER} markers but {len(imgs)} images")
        out.append(RawSample("sft", [_image(root, i, where) for i in imgs], turns=turns))
    return out


def load_mmc4_jsonl(path: str | Path, image_root: str | Path | None = None) -> list[RawSample]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: MMC4 JSONL file not found")
    root = Path(image_root) if image_root else path.parent
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e})") from None
        texts, infos = doc.get("text_list"), doc.get("image_info", [])
        if not isinstance(texts, list):
            raise InputError(f"{where}: 'text_list' must be a list of sentences")
        before: dict[int, list[Path]] = {}
        for info in infos:
            idx = info.get("matched_text_index")
            if not isinstance(idx, int) or not 0 <= idx < len(texts):
                raise InputError(f"{where}: matched_text_index {idx!r} out of range for {len(texts)} sentences")
            before.setdefault(idx, []).append(_image(root, info.get("image_name", ""), where))
        parts, images = [], []
        for i, sentence in enumerate(texts):
            for img in before.get(i, []):
                parts.append(IMAGE_PLACEHOLDER)
                images.append(img)
            parts.append(str(sentence))
        out.append(RawSample("doc", images, text=" ".join(parts)))
    return out
