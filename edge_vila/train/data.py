"""Training samples for each stage, their tokenization (with image slots and answer-only
labels) and batch collation.

A sample is drawn from (seed, stage, step, rank, index), so data is reproducible across
runs, ranks and resumes without any data-loader state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from ..config import PreprocessSpec
from ..preprocess import preprocess_images
from ..prompt import IMAGE_PLACEHOLDER, ChatTemplate, TextTokenizer, split_images
from ..synthetic import textdata, world

IMAGE_SLOT = -1
IGNORE = -100
# Share of "is there ...?"-no questions in training that name a scene object with its colour
# or its shape changed (world.ask). At the eval's rate (most negatives name a colour or shape
# that is absent) the tiny model learned "yes if both words are present": 39 of its 43
# "exists" errors on the eval were no -> yes, with one object in the image as well.
HARD_NEGATIVES = 0.5
MIX_KINDS = ("captions", "captions_hard", "interleaved", "text", "vqa", "scene_text", "multi", "llava", "mmc4")


@dataclass
class Sample:
    kind: str  # caption | doc | text | sft
    images: list = field(default_factory=list)  # PIL images or paths
    text: str = ""  # caption / doc / text, with <image> markers
    turns: list[tuple[str, str]] = field(default_factory=list)  # sft: (user with <image>, answer)
    qtype: str = ""


def synthetic_sample(kind: str, rng: np.random.Generator, image_size: int) -> Sample:
    if kind == "captions_hard":  # a group of hard negatives (CLIP stage); see world.scene_variants
        return [Sample("caption", [v.render(image_size)], text=f"{IMAGE_PLACEHOLDER}\n{v.caption()}")
                for v in world.scene_variants(rng)]
    if kind == "captions":
        s = world.random_scene(rng)
        return Sample("caption", [s.render(image_size)], text=f"{IMAGE_PLACEHOLDER}\n{s.caption()}")
    if kind == "interleaved":
        scenes = [world.random_scene(rng) for _ in range(int(rng.integers(1, 3)))]
        parts = []
        for s in scenes:
            parts.append(f"{IMAGE_PLACEHOLDER} {s.caption()}")
            if rng.random() < 0.5:
                parts.append(textdata.sentence(rng))
        return Sample("doc", [s.render(image_size) for s in scenes], text=" ".join(parts))
    if kind == "text":
        return Sample("text", text=textdata.paragraph(rng))
    if kind == "multi":
        qa = world.make_question(rng, "compare")
        # no markers: images are placed where the template places them at run time, so
        # training and `edge-vila chat --image ...` see the same prompt
        return Sample("sft", [s.render(image_size) for s in qa.scenes], turns=[(qa.question, qa.answer)],
                      qtype=qa.qtype)
    if kind == "vqa":  # 1-4 turns about one image, as in LLaVA's instruction data
        qas = world.conversation(rng, hard_negatives=HARD_NEGATIVES)
        return Sample("sft", [s.render(image_size) for s in qas[0].scenes], turns=[(q.question, q.answer) for q in qas],
                      qtype=qas[0].qtype)
    if kind == "scene_text":  # the VQA conversation with the scene described in words where the image would be
        qas = world.conversation(rng, hard_negatives=HARD_NEGATIVES)
        desc = qas[0].scenes[0].caption()
        return Sample("sft", [], turns=[(f"{qas[0].question}\n{desc}", qas[0].answer)]
                      + [(q.question, q.answer) for q in qas[1:]], qtype=qas[0].qtype)
    raise ValueError(f"unknown data kind {kind!r}")


def tokenize(sample: Sample, tok: TextTokenizer, template: ChatTemplate, tokens_per_image: int) -> tuple[list[int], list[int]]:
    """-> (ids with IMAGE_SLOT for image tokens, labels with IGNORE where no loss)."""
    ids: list[int] = [tok.bos_id] if tok.bos_id is not None else []
    labels: list[int] = [IGNORE] * len(ids)
    eos = tok.eos_id

    def add(text: str, train: bool) -> None:
        for part in split_images(text):
            if part is None:
                ids.extend([IMAGE_SLOT] * tokens_per_image)
                labels.extend([IGNORE] * tokens_per_image)
            else:
                t = tok.encode(part)
                ids.extend(t)
                labels.extend(t if train else [IGNORE] * len(t))

    if sample.kind == "sft" and sample.images and not any(IMAGE_PLACEHOLDER in u for u, _ in sample.turns):
        first = template.attach_images(sample.turns[0][0], len(sample.images))
        sample = Sample(sample.kind, sample.images, sample.text, [(first, sample.turns[0][1])] + sample.turns[1:],
                        sample.qtype)
    marks = sample.text.count(IMAGE_PLACEHOLDER) + sum(u.count(IMAGE_PLACEHOLDER) for u, _ in sample.turns)
    if marks != len(sample.images):
        raise ValueError(f"{sample.kind} sample has {marks} {IMAGE_PLACEHOLDER} markers but {len(sample.images)} images")
    if sample.kind == "sft":
        head = template.head()
        if head:
            add(head, False)
        for user, answer in sample.turns:
            add(template.user(user), False)
            add((" " if template.user_fmt.endswith(":") else "") + answer + template.assistant_end, True)
    else:  # captions / documents / text: loss on all text (VILA's plain format for captions)
        add(sample.text, True)
        if eos is not None:
            ids.append(eos)
            labels.append(eos)
    return ids, labels


@dataclass
class Batch:
    ids: "object"  # torch.LongTensor [B, L]
    labels: "object"  # [B, L]
    pixels: "object | None"  # [N, 3, H, W]
    n_samples: int
    # packed rows only: position within its sample [B, L], and which sample (0, 1, ... per row;
    # the row's padding is one more segment of its own)
    positions: "object | None" = None
    segments: "object | None" = None


def _truncate(ids: list[int], labels: list[int], images: list, max_len: int,
              tokens_per_image: int) -> tuple[list[int], list[int], list]:
    """Cut to max_len, but never through an image: a partly cut one is dropped with its slots."""
    if len(ids) <= max_len:
        return ids, labels, images
    cut = max_len
    slots = ids[:cut].count(IMAGE_SLOT)
    cut -= slots % max(tokens_per_image, 1)  # a partial image's slots end exactly at the cut
    return ids[:cut], labels[:cut], images[: slots // max(tokens_per_image, 1)]


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sample indices per row, no row longer than `capacity`."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def collate(samples: Sequence[Sample], tok: TextTokenizer, template: ChatTemplate, tokens_per_image: int,
            pre: PreprocessSpec | None, max_len: int, pack: bool = False) -> Batch:
    """Right-padded batch: with causal attention, real tokens never see the padding,
    so no padding mask is needed; padded labels are ignored.

    pack=True puts several samples in a row (rows as long as the longest sample: longer rows
    cost more attention than they save), with positions restarting per sample and `segments`
    for a block-causal mask: the same loss and gradients as one sample per row (tests check
    it) on ~25% fewer rows of the tiny recipe's SFT data."""
    import torch

    seqs = [_truncate(*tokenize(s, tok, template, tokens_per_image), s.images, max_len, tokens_per_image)
            for s in samples]
    L = max(len(i) for i, _, _ in seqs)
    rows = pack_rows([len(i) for i, _, _ in seqs], L) if pack else [[b] for b in range(len(seqs))]
    pad = tok.vocab.get("<pad>", 0)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), L), dtype=torch.long) if pack else None
    segments = torch.full((len(rows), L), len(samples), dtype=torch.long) if pack else None
    images = []  # in order of appearance in the rows: the model fills image slots row-major
    for r, members in enumerate(rows):
        at = 0
        for n, b in enumerate(members):
            i, lab, s_images = seqs[b]
            lab = list(lab)
            if at:  # a sample's first token is never a target (unpacked, nothing precedes it)
                lab[0] = IGNORE
            ids[r, at: at + len(i)] = torch.tensor(i)
            labels[r, at: at + len(lab)] = torch.tensor(lab)
            if pack:
                positions[r, at: at + len(i)] = torch.arange(len(i))
                segments[r, at: at + len(i)] = n
            images.extend(s_images)
            at += len(i)
        if pack and at < L:
            positions[r, at:] = torch.arange(L - at)
    pixels = torch.from_numpy(preprocess_images(images, pre)) if images and pre is not None else None
    return Batch(ids, labels, pixels, len(samples), positions, segments)


def draw_samples(mix: dict[str, float], n: int, rng: np.random.Generator, image_size: int,
                 real: "RealData | None" = None) -> list[Sample]:
    kinds = [k for k, w in mix.items() if w > 0]
    if not kinds:
        raise ValueError("empty data mix")
    unknown = set(kinds) - set(MIX_KINDS)
    if unknown:
        raise ValueError(f"unknown data kinds {sorted(unknown)} (expected {MIX_KINDS})")
    w = np.array([mix[k] for k in kinds], dtype=np.float64)
    out: list[Sample] = []
    while len(out) < n:
        kind = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
        if kind in ("llava", "mmc4"):
            if real is None:
                raise ValueError(f"data mix names {kind!r} but no {kind} file is configured")
            out.append(real.sample(kind, rng))
        else:
            s = synthetic_sample(kind, rng, image_size)
            out.extend(s if isinstance(s, list) else [s])
    return out[:n]


class RealData:
    """User data in LLaVA-JSON / MMC4-JSONL form, loaded once, sampled by index."""

    def __init__(self, llava_json: str | None = None, mmc4_jsonl: str | None = None, image_root: str | None = None):
        from .formats import load_llava_json, load_mmc4_jsonl

        self.items = {"llava": load_llava_json(llava_json, image_root) if llava_json else [],
                      "mmc4": load_mmc4_jsonl(mmc4_jsonl, image_root) if mmc4_jsonl else []}

    def sample(self, kind: str, rng: np.random.Generator) -> Sample:
        items = self.items[kind]
        if not items:
            raise ValueError(f"no {kind} data loaded")
        s = items[int(rng.integers(len(items)))]
        return Sample(s.kind, [Image.open(p).convert("RGB") for p in s.images], s.text, s.turns)
