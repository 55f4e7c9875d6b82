"""Evaluation through the runtime API, so it works for checkpoints and bundles alike.

- shapes-vqa: held-out questions from the synthetic world (seeds the training stream
  never draws), greedy answers, exact match per question type.
- text probe: perplexity of held-out text, scored token by token through the backend.
"""
from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from ..progress import tqdm

from . import textdata, world

log = logging.getLogger(__name__)

EVAL_SEED = 987_654_321  # disjoint from training streams, which are keyed by (seed, stage, step, rank)


def eval_shapes_vqa(pipe, n: int = 500, seed: int = EVAL_SEED, progress: bool = True,
                    image_dir: Path | None = None) -> dict:
    """Exact match per question type, plus what a diagnosis needs: accuracy by number of
    objects in the (first) image, and the most common wrong answers per type — e.g. "circle
    named square" or "right when one object, wrong with three" point at different causes.
    The first 12 questions are kept as examples (with their scenes' captions); `image_dir`
    also saves their images there as PNG, for a person to look at."""
    size = pipe.cfg.preprocess.height
    per = defaultdict(lambda: [0, 0])
    by_objects = defaultdict(lambda: [0, 0])
    confusions: dict[str, Counter] = defaultdict(Counter)
    examples = []
    for i in tqdm(range(n), desc="shapes-vqa", disable=not progress):
        rng = world.rng_for(seed, i)
        qa = world.make_question(rng, world.QUESTION_TYPES[i % len(world.QUESTION_TYPES)])
        # no markers: the template places the images as it did in training
        out = pipe.generate(qa.question, images=[s.render(size) for s in qa.scenes], max_new_tokens=6)
        got, want = world.normalize_answer(out), world.normalize_answer(qa.answer)
        ok = got == want
        for tally in (per[qa.qtype], by_objects[str(len(qa.scenes[0].objects))]):
            tally[0] += ok
            tally[1] += 1
        if not ok:
            confusions[qa.qtype][f"{want} -> {got or '(empty)'}"] += 1
        if len(examples) < 12:
            ex = {"type": qa.qtype, "question": qa.question, "answer": qa.answer, "output": out, "ok": ok,
                  "scenes": [sc.caption() for sc in qa.scenes]}
            if image_dir is not None:
                image_dir.mkdir(parents=True, exist_ok=True)
                ex["images"] = []
                for j, sc in enumerate(qa.scenes):
                    f = image_dir / f"example{len(examples)}-{j}.png"
                    sc.render(max(size, 256)).save(f)
                    ex["images"].append(str(f))
            examples.append(ex)
    acc = {k: c / t for k, (c, t) in sorted(per.items())}
    total = sum(c for c, _ in per.values()) / max(1, sum(t for _, t in per.values()))
    return {"task": "shapes-vqa", "n": n, "accuracy": total, "per_type": acc,
            "by_objects": {k: c / t for k, (c, t) in sorted(by_objects.items())},
            "top_errors": {k: dict(v.most_common(3)) for k, v in sorted(confusions.items())},
            "examples": examples}


def text_perplexity(pipe, texts: list[str] | None = None, max_tokens: int = 4000) -> dict:
    """exp(mean NLL) of each next token given its prefix, via the backend's forward."""
    texts = texts or textdata.heldout_text()
    tok, be = pipe.tokenizer, pipe.backend
    nll, count = 0.0, 0
    for text in texts:
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text)
        ids = ids[: be.max_context]
        logits = be.forward(be.embed(np.asarray(ids[:1])), 0)
        for pos in range(1, len(ids)):
            lp = logits - logits.max()
            lp = lp - math.log(float(np.exp(lp).sum()))
            nll -= float(lp[ids[pos]])
            count += 1
            logits = be.forward(be.embed(np.asarray(ids[pos:pos + 1])), pos)
        if count >= max_tokens:
            break
    pipe.generator.state.reset()  # the cache now holds probe text, not what the prefix state remembers
    return {"task": "text-ppl", "tokens": count, "perplexity": math.exp(nll / max(count, 1))}
