"""Text-only data for the SFT blend and the text probe: simple English generated from a
small grammar (deterministic by seed, nothing downloaded). Held-out text uses seeds the
training stream never draws."""
from __future__ import annotations

import numpy as np

_SUBJ = ["the robot", "a small dog", "my neighbour", "the old farmer", "a curious child", "the engineer",
         "the camera", "a tired student", "the red car", "our team", "the teacher", "a quiet cat"]
_VERB = ["sees", "likes", "carries", "paints", "follows", "builds", "finds", "moves", "cleans", "watches"]
_OBJ = ["a wooden box", "the blue door", "three apples", "the long road", "a bright lamp", "the garden",
        "a paper map", "the heavy table", "two cups of tea", "the window"]
_WHEN = ["in the morning", "after lunch", "every day", "at night", "on sunday", "before the rain", "slowly",
         "again", "with care", "near the river"]
_FACTS = ["A triangle has three sides.", "A square has four equal sides.", "A circle has no corners.",
          "Red and yellow make orange.", "Blue and red make purple.", "Two plus two is four.",
          "One plus two is three.", "The sun rises in the east.", "Water freezes at zero degrees.",
          "A week has seven days.", "Robots use cameras to see.", "Green is the colour of grass."]
_NUM = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def sentence(rng: np.random.Generator) -> str:
    k = rng.integers(4)
    if k == 0:
        return str(rng.choice(_FACTS))
    if k == 1:
        a, b = int(rng.integers(0, 5)), int(rng.integers(0, 5))
        return f"{_NUM[a].capitalize()} plus {_NUM[b]} is {_NUM[a + b]}."
    s = f"{rng.choice(_SUBJ)} {rng.choice(_VERB)} {rng.choice(_OBJ)} {rng.choice(_WHEN)}."
    return s[0].upper() + s[1:]


def paragraph(rng: np.random.Generator, n: int | None = None) -> str:
    return " ".join(sentence(rng) for _ in range(n or int(rng.integers(2, 5))))


def heldout_text(n_paragraphs: int = 40, seed: int = 10_000_019) -> list[str]:
    rng = np.random.default_rng(seed)
    return [paragraph(rng, 4) for _ in range(n_paragraphs)]


def vocabulary_corpus() -> list[str]:
    """Every word the grammar can produce (for training the tiny tokenizer)."""
    return _SUBJ + _VERB + _OBJ + _WHEN + _FACTS + [" ".join(_NUM)] + [paragraph(np.random.default_rng(i)) for i in range(200)]
