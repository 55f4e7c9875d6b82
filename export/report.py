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
    errs, agree, total = [], 0, 0
    for k, prompt in enumerate(prompts):
        imgs = list(images[k % len(images): k % len(images) + 1]) if images else []
        ref.generate(prompt, images=imgs, max_new_tokens=steps)
        toks = ref.stats.tokens
        chat_r, chat_b = ref.chat(), bundle.chat()
        keys_r = _keys(chat_r, prompt, imgs)
        keys_b = _keys(chat_b, prompt, imgs)
        lr = _score(ref, keys_r, toks)
        lb = _score(bundle, keys_b, toks)
        for a, b in zip(lr, lb):
            errs.append(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-6)))
            agree += int(np.argmax(a) == np.argmax(b))
            total += 1
    return {"prompts": len(prompts), "steps": total, "greedy_agreement": agree / max(total, 1),
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
    import edge_vila
    from edge_vila.train import world
    from edge_vila.train.eval import eval_shapes_vqa

    # the TensorRT-meant graph itself, at ORT's exact accuracy level
    b = edge_vila.load(bundle, exact=True, variant="bundle")
    rep: dict = {"bundle": str(bundle), "onnxruntime_accuracy_level": 0}
    images = []
    if b.cfg.is_multimodal:
        rng = world.rng_for(31337)
        images = [world.random_scene(rng).render(b.cfg.preprocess.height) for _ in range(3)]
    if quantized_ref is not None:
        ref = edge_vila.load(quantized_ref, max_context=b.backend.max_context)
        rep["vs_torch_reference"] = logit_agreement(ref, b, PROMPTS, images)
        rep["vs_torch_reference"]["reference"] = str(quantized_ref)
    from edge_vila.config import load_config

    if b.cfg.is_multimodal and n and load_config(float_ckpt).knows_synthetic_world:
        fl = edge_vila.load(float_ckpt, max_context=b.backend.max_context)
        rf, rb = eval_shapes_vqa(fl, n, progress=False), eval_shapes_vqa(b, n, progress=False)
        rep["shapes_vqa"] = {"n": n, "float": rf["accuracy"], "bundle": rb["accuracy"],
                             "delta_points": 100 * (rb["accuracy"] - rf["accuracy"]),
                             "per_type_float": rf["per_type"], "per_type_bundle": rb["per_type"]}
    return rep
