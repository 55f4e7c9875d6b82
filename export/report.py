"""report.json: how far the bundle (run in ONNX Runtime) is from the float model and from
the torch reference of the quantized checkpoint."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PROMPTS = ["Describe the image.", "What color is the circle?", "How many shapes are there?",
           "Write one sentence about robots.", "Where is the red square?"]


def logit_agreement(ref, bundle, prompts: list[str], images=(), steps: int = 12) -> dict:
    """Teacher-forced on the reference's greedy tokens: max |logit error| relative to the
    logit scale, and whether the bundle's greedy choice agrees at every step."""
    return compare_logits(bundle, reference_logits(ref, prompts, images, steps))


def reference_logits(ref, prompts: list[str], images=(), steps: int = 12) -> list[tuple]:
    """(prompt, images, greedy tokens, logits at each step) of the reference pipeline, in one
    greedy pass per prompt, so the reference can be freed before the bundle is loaded (at
    3B, holding both is most of the export's peak memory)."""
    out = []
    for k, prompt in enumerate(prompts):
        imgs = list(images[k % len(images): k % len(images) + 1]) if images else []
        keys, image_embeds = _keys(ref.chat(), prompt, imgs)
        gen = ref.generator
        gen.state.reset()
        logits = [gen._forward(keys, 0, image_embeds)]
        toks = [int(np.argmax(logits[-1]))]
        pos = len(keys)
        for _ in range(steps - 1):
            logits.append(gen._forward([toks[-1]], pos, image_embeds))
            toks.append(int(np.argmax(logits[-1])))
            pos += 1
        gen.state.reset()
        out.append((prompt, imgs, toks, logits))
    return out


def compare_logits(bundle, recorded: list[tuple]) -> dict:
    errs, agree, total = [], 0, 0
    for prompt, imgs, toks, lr in recorded:
        lb = _score(bundle, _keys(bundle.chat(), prompt, imgs), toks)
        for a, b in zip(lr, lb):
            errs.append(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-6)))
            agree += int(np.argmax(a) == np.argmax(b))
            total += 1
    return {"prompts": len(recorded), "steps": total, "greedy_agreement": agree / max(total, 1),
            "max_rel_logit_err": max(errs) if errs else 0.0}


def _keys(chat, prompt: str, imgs) -> tuple[list, dict]:
    keys, hashes, _ = chat.prompt_keys(prompt, imgs)
    return keys, chat.pipe.image_embeds(hashes)


def _score(pipe, keys_images, toks) -> list[np.ndarray]:
    keys, images = keys_images
    gen = pipe.generator
    gen.state.reset()
    out = [gen._forward(keys, 0, images)]
    pos = len(keys)
    for t in toks[:-1]:
        out.append(gen._forward([t], pos, images))
        pos += 1
    gen.state.reset()
    return out


def bundle_report(float_ckpt: Path, bundle: Path, n: int = 200, quantized_ref: Path | None = None) -> dict:
    """The reference runs first and is freed before the bundle loads: peak memory is the
    larger of the two, not their sum."""

    import edge_vila
    from edge_vila.bundle import read_manifest
    from edge_vila.fsutil import release_freed_memory
    from edge_vila.config import load_config
    from edge_vila.synthetic import world
    from edge_vila.synthetic.eval import eval_shapes_vqa

    man = read_manifest(bundle, verify=False)
    multimodal = man.preprocess is not None
    images = []
    if multimodal:
        rng = world.rng_for(31337)
        images = [world.random_scene(rng).render(man.preprocess["height"]) for _ in range(3)]
    # the prompts need a few hundred positions; a smaller cache than the bundle's keeps the
    # reference's float32 KV small at 3B (the bundle's graph grows its cache as it goes)
    ctx = min(man.model.max_context, 1024)
    recorded = None
    release_freed_memory()  # what writing the bundle freed
    if quantized_ref is not None:
        ref = edge_vila.load(quantized_ref, max_context=ctx)
        # the torch reference dequantizes every INT4 weight at every step: at billions of
        # parameters, 3 prompts x 8 steps (what benchmarks/scale.py asks) instead of 5 x 12
        big = (man.model.params or 0) > 1e9
        recorded = reference_logits(ref, PROMPTS[:3] if big else PROMPTS, images, steps=8 if big else 12)
        del ref
        release_freed_memory()
    # the TensorRT-meant graph itself, at ORT's exact accuracy level
    b = edge_vila.load(bundle, exact=True, variant="bundle")
    rep: dict = {"bundle": str(bundle), "onnxruntime_accuracy_level": 0}
    if recorded is not None:
        rep["vs_torch_reference"] = compare_logits(b, recorded)
        rep["vs_torch_reference"]["reference"] = str(quantized_ref)
    if multimodal and n and load_config(float_ckpt).knows_synthetic_world:
        rb = eval_shapes_vqa(b, n, progress=False)
        del b
        release_freed_memory()
        fl = edge_vila.load(float_ckpt, max_context=ctx)
        rf = eval_shapes_vqa(fl, n, progress=False)
        rep["shapes_vqa"] = {"n": n, "float": rf["accuracy"], "bundle": rb["accuracy"],
                             "delta_points": 100 * (rb["accuracy"] - rf["accuracy"]),
                             "per_type_float": rf["per_type"], "per_type_bundle": rb["per_type"]}
    return rep
