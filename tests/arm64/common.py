"""What both halves of scripts/arm64_check.sh run: the same prompts, image and load modes."""
from __future__ import annotations

import numpy as np

PROMPTS = ["What shape is in the image?", "What color is the shape?", "Describe the image.",
           "Where is the shape in the image?", "Is there a circle in the image? Answer in a sentence."]
# exact: the bundle graph through ORT's own kernels; ours: the fast graph with our INT4 linear and
# attention ops over the INT8 KV cache (NEON dot product on aarch64, AVX-512/AVX2 on x86)
MODES = {"exact": {"exact": True}, "ours": {"matmul": "edge", "attention": "edge"}}
NEW_TOKENS = 16


def image() -> np.ndarray:
    """A red square on grey (the shapes world the tiny model knows), made the same everywhere."""
    img = np.full((96, 96, 3), 128, np.uint8)
    img[24:72, 24:72] = (220, 30, 30)
    return img


def run_modes(bundle) -> dict:
    import edge_vila

    out = {}
    for name, kw in MODES.items():
        pipe = edge_vila.load(bundle, **kw)
        be = pipe.backend
        tokens, texts = [], []
        for p in PROMPTS:
            texts.append(pipe.generate(p, images=[image()], max_new_tokens=NEW_TOKENS, temperature=0.0))
            tokens.append(list(pipe.stats.tokens))
        out[name] = {"tokens": tokens, "texts": texts,
                     "variant": be.variant, "kv_cache": be.kv_cache, "matmul": be.matmul, "attention": be.attention}
    return out
