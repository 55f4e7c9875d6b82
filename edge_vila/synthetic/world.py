"""A synthetic visual world with checkable answers: 1-3 coloured shapes on varied
backgrounds, their captions, and questions of six types.

Numpy + Pillow only (no torch): the `synthetic://` video source and the eval use it too.
Every scene is a pure function of its seed, so data is identical across runs, ranks
and resumes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230),
    "yellow": (240, 220, 30), "purple": (150, 40, 190), "orange": (250, 140, 20),
}
SHAPES = ("square", "circle", "triangle")
REGIONS = ("left", "right", "top", "bottom")
REGION_CENTER = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
JITTER = 0.04  # a shape's centre lies within +-JITTER (per axis, fraction of the side) of its region's centre
BACKGROUNDS = [(235, 235, 235), (200, 200, 200), (90, 90, 90), (40, 40, 40), (225, 210, 185), (170, 190, 200),
               (200, 225, 205), (120, 110, 100)]
NUMBER_WORDS = ["zero", "one", "two", "three"]
QUESTION_TYPES = ("count", "color", "shape", "exists", "where", "compare")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    region: str
    size: float  # radius as a fraction of the image side


@dataclass
class Scene:
    objects: list[Obj]
    background: tuple[int, int, int]
    seed: int
    jitter: list[tuple[float, float]] = field(default_factory=list)

    def render(self, size: int = 64) -> Image.Image:
        rng = np.random.default_rng(self.seed + 7)
        base = np.array(self.background, np.int16)[None, None] + rng.integers(-12, 13, (size, size, 3))
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for o, (jx, jy) in zip(self.objects, self.jitter):
            cx, cy = REGION_CENTER[o.region]
            cx, cy, r = (cx + jx) * size, (cy + jy) * size, o.size * size
            fill = COLORS[o.color]
            if o.shape == "square":
                draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
            elif o.shape == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        return img

    def count(self, shape: str | None = None) -> int:
        return sum(1 for o in self.objects if shape is None or o.shape == shape)

    def caption(self) -> str:
        parts = [f"{'an' if o.color[0] in 'aeiou' else 'a'} {o.color} {o.shape} on the {o.region}"
                 for o in self.objects]
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return text[0].upper() + text[1:] + "."


def random_scene(rng: np.random.Generator, n: int | None = None) -> Scene:
    n = int(rng.integers(1, 4)) if n is None else n
    regions = rng.choice(REGIONS, size=n, replace=False)
    colors = list(COLORS)
    objs = [Obj(str(rng.choice(SHAPES)), str(rng.choice(colors)), str(r), float(rng.uniform(0.1, 0.16)))
            for r in regions]
    jitter = [(float(rng.uniform(-JITTER, JITTER)), float(rng.uniform(-JITTER, JITTER))) for _ in objs]
    return Scene(objs, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], int(rng.integers(2**31)), jitter)


def scene_variants(rng: np.random.Generator, k: int = 4) -> list[Scene]:
    """A scene and k-1 hard negatives with the same background: objects moved to other
    regions, colours swapped between objects, or a shape changed. In a CLIP batch these
    force the pooled image feature to encode *where* and *which colour goes with which
    shape*, not just which colours and shapes are present.

    Shape changes are weighted up (58% of negatives, was 47% with a third per kind): the
    ViT had learned colour and place but barely told circles from squares (linear shape
    probe on its pooled features 75% after 1000 CLIP steps; 88% with this weighting), and
    the tiny recipe's VQA over seeds became higher and far steadier (docs/training.md, "What
    mattered")."""
    base = random_scene(rng)
    out = [base]
    while len(out) < k:
        objs = list(base.objects)
        kind = rng.choice(3, p=[0.25, 0.25, 0.5])  # move, swap colours, change a shape
        if kind == 0:
            free = [r for r in REGIONS]
            regs = rng.choice(free, size=len(objs), replace=False)
            objs = [Obj(o.shape, o.color, str(r), o.size) for o, r in zip(objs, regs)]
        elif kind == 1 and len(objs) > 1:
            cols = [o.color for o in objs]
            rng.shuffle(cols)
            objs = [Obj(o.shape, c, o.region, o.size) for o, c in zip(objs, cols)]
        else:
            j = int(rng.integers(len(objs)))
            o = objs[j]
            objs[j] = Obj(str(rng.choice([s for s in SHAPES if s != o.shape])), o.color, o.region, o.size)
        v = Scene(objs, base.background, int(rng.integers(2**31)), base.jitter)
        if v.caption() not in {x.caption() for x in out}:
            out.append(v)
    return out


@dataclass
class QA:
    qtype: str
    question: str
    answer: str
    scenes: list[Scene]


def _plural(shape: str) -> str:
    return shape + "s"


def make_question(rng: np.random.Generator, qtype: str | None = None) -> QA:
    """One question with a unique, checkable one-word answer."""
    qtype = qtype or str(rng.choice(QUESTION_TYPES))
    if qtype == "compare":
        shape = str(rng.choice(SHAPES))
        while True:
            a, b = random_scene(rng), random_scene(rng)
            if a.count(shape) != b.count(shape):
                break
        ans = "first" if a.count(shape) > b.count(shape) else "second"
        return QA(qtype, f"Which image has more {_plural(shape)}?", ans, [a, b])
    for _ in range(100):  # ask() rejects an unknown type on the first try
        qa = ask(random_scene(rng), rng, qtype)
        if qa is not None:
            return qa
    raise RuntimeError(f"could not make a {qtype} question")  # pragma: no cover - probability ~0


def ask(s: Scene, rng: np.random.Generator, qtype: str, hard_negatives: float = 0.0) -> QA | None:
    """A single-image question of `qtype` about scene `s`, or None when this scene has
    no unambiguous one (e.g. 'what color is the circle?' with two circles).

    `hard_negatives`: the share of "is there a <colour> <shape>?"-is-no questions that name
    an object of the scene with one attribute changed (its colour or, as often, its shape), so
    the colour, the shape or both are in the scene but not on one object. Training asks more of
    them than the eval (0): a model that answers "yes" when the words are present, without
    checking they belong to one object, is then corrected often."""
    shapes = [o.shape for o in s.objects]
    colors = [o.color for o in s.objects]
    if qtype == "count":
        if rng.random() < 0.5:
            return QA(qtype, "How many shapes are there?", str(s.count()), [s])
        shape = str(rng.choice(SHAPES))
        return QA(qtype, f"How many {_plural(shape)} are there?", str(s.count(shape)), [s])
    if qtype == "color":
        uniq = [o for o in s.objects if shapes.count(o.shape) == 1]
        if uniq:
            o = uniq[int(rng.integers(len(uniq)))]
            return QA(qtype, f"What color is the {o.shape}?", o.color, [s])
    elif qtype == "shape":
        uniq = [o for o in s.objects if colors.count(o.color) == 1]
        if uniq:
            o = uniq[int(rng.integers(len(uniq)))]
            return QA(qtype, f"What shape is the {o.color} object?", o.shape, [s])
    elif qtype == "exists":
        if rng.random() < 0.5:
            o = s.objects[int(rng.integers(len(s.objects)))]
            return QA(qtype, f"Is there a {o.color} {o.shape}?", "yes", [s])
        present = {(o.color, o.shape) for o in s.objects}
        if hard_negatives > 0 and rng.random() < hard_negatives:  # the eval (0) draws as it always did
            o = s.objects[int(rng.integers(len(s.objects)))]
            other_shape = [(o.color, sh) for sh in SHAPES if (o.color, sh) not in present]
            other_color = [(c, o.shape) for c in COLORS if (c, o.shape) not in present]
            near = other_shape if other_shape and rng.random() < 0.5 else other_color  # never both empty
            c, sh = near[int(rng.integers(len(near)))]
            return QA(qtype, f"Is there a {c} {sh}?", "no", [s])
        while True:
            c, sh = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
            if (c, sh) not in present:
                return QA(qtype, f"Is there a {c} {sh}?", "no", [s])
    elif qtype == "where":
        uniq = [o for o in s.objects if sum(1 for p in s.objects if (p.color, p.shape) == (o.color, o.shape)) == 1]
        if uniq:
            o = uniq[int(rng.integers(len(uniq)))]
            return QA(qtype, f"Where is the {o.color} {o.shape}?", o.region, [s])
    elif qtype != "compare":
        raise ValueError(f"unknown question type {qtype!r} (expected one of {QUESTION_TYPES})")
    return None


def conversation(rng: np.random.Generator, max_turns: int = 4, hard_negatives: float = 0.0) -> list[QA]:
    """Several single-image questions about one scene (LLaVA-style multi-turn data):
    one image's tokens then carry the loss of several answers."""
    s = random_scene(rng)
    single = [t for t in QUESTION_TYPES if t != "compare"]
    qas: list[QA] = []
    for _ in range(int(rng.integers(1, max_turns + 1))):
        qa = ask(s, rng, str(rng.choice(single)), hard_negatives)
        if qa is not None and qa.question not in {q.question for q in qas}:
            qas.append(qa)
    return qas or [ask(s, rng, "count")]


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: lower case, no punctuation/articles, number words -> digits."""
    t = text.strip().lower().strip(" .!?,;:'\"")
    for art in ("the ", "a ", "an "):
        if t.startswith(art):
            t = t[len(art):]
    t = t.split()[0] if t.split() else ""
    t = t.strip(".!?,;:")
    return str(NUMBER_WORDS.index(t)) if t in NUMBER_WORDS else t


def rng_for(seed: int, *stream: int) -> np.random.Generator:
    """Independent, reproducible generator for (seed, stage, step, rank, ...)."""
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))
