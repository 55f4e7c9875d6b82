"""What both halves of the emulated checks (scripts/arm64_check.sh, scripts/avx2_check.sh) run:
the same prompts, images and load modes, and the INT8 ViT forms held against the float ViT."""
from __future__ import annotations

import json
import time

import numpy as np

PROMPTS = ["What shape is in the image?", "What color is the shape?", "Describe the image.",
           "Where is the shape in the image?", "Is there a circle in the image? Answer in a sentence."]
# exact: the bundle graph through ORT's own kernels; ours: the fast graph with our INT4 linear and
# attention ops over the INT8 KV cache (NEON dot product on aarch64, AVX-512/AVX2 on x86)
MODES = {"exact": {"exact": True}, "ours": {"matmul": "edge", "attention": "edge"}}
NEW_TOKENS = 16
# the CPU's INT8 ViT forms (backends/vision_cpu.py): U8S8, U8U8 and edge (our Int8Linear op; both
# without int16 saturation on x86 without VNNI) and the bundle's own S8; each is asked for by name, never "auto": under qemu-user
# /proc/cpuinfo is the host's, so auto would follow the host's flags, not the emulated CPU's
FORMS = ("u8", "u8u8", "edge", "s8")
MIN_COSINE = 0.999


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


def scenes(n: int = 4) -> list[np.ndarray]:
    """Images with full-range pixels (gradients, edges, noise), the same on every machine: the
    shapes image and seeded PCG64 noise, whose stream numpy fixes across platforms."""
    rng = np.random.default_rng(25)
    out = [image()]
    y, x = np.mgrid[0:96, 0:96]
    for i in range(1, n):
        img = np.stack([(x * (2 + i)) % 256, (y * 3 + 40 * i) % 256, ((x + y) * i) % 256], -1).astype(np.float64)
        img = 0.6 * img + 0.4 * rng.integers(0, 256, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def vision_features(bundle, **load):
    """(the projector's output for each of scenes(), flattened, float64: [images, tokens * width];
    the pipeline that made it)"""
    import edge_vila

    pipe = edge_vila.load(bundle, **load)
    hs = [pipe.encode_images([im])[0][0] for im in scenes()]
    return np.stack([pipe.image_embeds([h])[h].reshape(-1) for h in hs]).astype(np.float64), pipe


def vision_cosines(feats: np.ndarray, ref: np.ndarray) -> list[float]:
    return [float(c) for c in (feats * ref).sum(-1) / np.linalg.norm(feats, axis=-1) / np.linalg.norm(ref, axis=-1)]


def check_vision(work, must_hold=FORMS) -> dict:
    """Each INT8 form's features against the float ViT's, as exported and run on the host: the
    forms in must_hold keep cosine >= MIN_COSINE on every image; the others are reported."""
    ref = np.load(work / "vision_fp32.npy")
    fp32, pipe = vision_features(work / "bundle-fp32")
    be = pipe.backend  # a load with every option at its default, as a user's first one
    print(f"   default load: {be.variant} graph, KV {be.kv_cache}, matmul {be.matmul}, attention {be.attention}")
    drift = float(np.abs(fp32 - ref).max() / np.abs(ref).max())
    assert drift < 1e-3, f"the float ViT here differs from the host's by {drift:.2e} of its range"
    out = {"fp32_vs_host": drift}
    for form in FORMS:
        feats, pipe = vision_features(work / "bundle", vision_int8=form)
        assert pipe.backend.vision_int8 == form, (form, pipe.backend.vision_int8)
        cos = vision_cosines(feats, ref)
        out[form] = cos
        held = form in must_hold
        print(f"   {form:5s} cosine to fp32: mean {np.mean(cos):.5f} min {min(cos):.5f}"
              f"{'' if held else ' (reported, not held)'}", flush=True)
        if held:
            assert min(cos) >= MIN_COSINE, f"INT8 ViT form {form}: cosine to fp32 {cos} < {MIN_COSINE}"
    return out


OP_TESTS = ["tests/test_int4_linear.py", "tests/test_int8_linear.py",
            "tests/test_decode_attention.py::test_matches_reference_over_prefill_decode_and_rewind",
            "tests/test_decode_attention.py::test_long_context_decode_split_over_positions"]


def step(msg: str) -> float:
    print(f"-- {msg}", flush=True)
    return time.time()


def done(t: float) -> None:
    print(f"   ok ({time.time() - t:.0f} s)", flush=True)


def check_op_tests(root, cpu: str, deselect: str) -> None:
    """The ops' numpy-reference tests, in this process: under qemu-user without binfmt_misc a
    child python would not run as the emulated CPU (aarch64: not at all)."""
    import os

    import pytest

    os.chdir(root)
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "--noconftest", "-x", *OP_TESTS, "-k", deselect])
    assert rc == 0, f"op tests failed on {cpu} (pytest rc {rc})"


def check_tokens(work, cpu: str) -> dict:
    """The host-exported bundle's greedy tokens here, in every mode, against the host run's."""
    ref = json.loads((work / "reference.json").read_text())
    got = run_modes(work / "bundle")
    for mode, want in ref["modes"].items():
        assert got[mode]["tokens"] == want["tokens"], (
            f"mode {mode}: {cpu} tokens {got[mode]['tokens']} != host {want['tokens']} "
            f"(texts {got[mode]['texts']} vs {want['texts']})")
        print(f"   {mode}: {got[mode]['variant']} graph, KV {got[mode]['kv_cache']}, matmul {got[mode]['matmul']}, "
              f"attention {got[mode]['attention']}: {sum(map(len, want['tokens']))} tokens equal to the host's")
    return got
