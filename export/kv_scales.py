"""INT8 KV-cache scales, computed at export and stored in the bundle (`kv_scales.safetensors`).

The CPU runtime keeps its KV cache in INT8 with static per-channel scales (decode reads the
whole cache every step; INT8 reads a quarter of FP32's bytes). The scales belong to the model,
not to the machine, so export computes them once from the bundle it has just written - its
own llm.onnx run in ONNX Runtime, its own embeddings and vision.onnx - and the bundle's
sha256 list covers them: a load never calibrates.

Calibration prompts are the way the runtime sends them: chat-formatted text and, for a VLM,
image embeddings from vision.onnx (synthetic scenes and a photo-like gradient) spliced in.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

from edge_vila.backends.cpu_cache import KV_SCALES_FILE as FILE, KV_SCALES_KEY as KEY

MARGIN = 1.25  # room for activations larger than the calibration's

# chat turns, questions about a scene, plain prose, numbers and code, so the scales cover the
# activations that templates, answers and odd tokens produce
CALIBRATION_TEXT = (
    "USER: What is in front of the robot? Describe the objects, their colours and where they are.\n"
    "ASSISTANT: There is a red cube on the left, a blue bottle in the middle and a person on the right.",
    "USER: How many circles are there? ASSISTANT: Two. USER: What color is the square? ASSISTANT: green. "
    "USER: Is there a yellow triangle? ASSISTANT: no. USER: Where is the purple circle? ASSISTANT: top.",
    "The warehouse robot stopped at the loading dock, scanned the pallets and reported three damaged "
    "boxes. Its battery was at 43 percent, so it planned a route back to the charger before noon.",
    "def plan(path, speed=0.5):\n    for x, y in path:\n        move(x, y, speed)  # metres, m/s\n"
    "    return {'ok': True, 'steps': len(path)}\n1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 -42 #@!?",
)


def calibration_sequences(backend) -> list[np.ndarray]:
    """Input embeddings [tokens, hidden] of the calibration prompts, through `backend`'s own
    embedding table and vision graph."""
    from edge_vila.prompt import TextTokenizer

    tok = TextTokenizer(backend.cfg.root)
    img = None
    if getattr(backend, "vision", None) is not None:
        from PIL import Image

        from edge_vila.preprocess import preprocess_images
        from edge_vila.synthetic import world

        pre = backend.cfg.preprocess
        side = max(pre.height, pre.width)
        pics = [world.random_scene(world.rng_for(5, i)).render(side) for i in range(3)]
        yy, xx = np.mgrid[0:side, 0:side] / max(side - 1, 1)
        pics.append(Image.fromarray((np.stack([xx, yy, 1 - xx * yy], -1) * 255).astype(np.uint8)))
        img = backend.encode_untiled(preprocess_images(pics, pre))  # [n_images, tokens, hidden]
    seqs = []
    for j, text in enumerate(CALIBRATION_TEXT):
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text)
        emb = backend.embed(np.asarray(ids[: backend.max_context // 2]))
        if img is not None:
            emb = np.concatenate([emb[:1], img[j % len(img)], emb[1:]])
        seqs.append(emb[: backend.max_context])
    return seqs


def kv_amax(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """[2, kv_heads, head_dim] largest magnitudes of one layer's cache ([kv_heads, n, head_dim]
    each). Keys are cached after RoPE, which rotates channel c with c + head_dim/2 by a
    position-dependent angle: a pair's bound is the pair's norm (the largest value either
    channel can take at any position), so positions beyond the calibration text are covered."""
    half = keys.shape[-1] // 2
    pair = np.sqrt(keys[..., :half] ** 2 + keys[..., half:] ** 2).max(axis=1)
    return np.stack([np.concatenate([pair, pair], axis=-1), np.abs(values).max(axis=1)])


def compute_kv_scales(bundle: Path) -> np.ndarray:
    """Scales for `bundle` (its manifest and llm.onnx written): the bundle graph run on the
    calibration prompts, the cache it returns read per layer."""
    from edge_vila.backends.onnxruntime import OrtBackend
    from edge_vila.bundle import load_bundle_config
    from edge_vila.options import RuntimeOptions

    cfg = load_bundle_config(bundle, verify=False)
    # as the runtime runs it by default (MatMulNBits with int8 activations), which the margin covers
    be = OrtBackend(cfg, RuntimeOptions(variant="bundle"), providers=["CPUExecutionProvider"])
    m = cfg.llm
    amax = np.zeros((m.num_layers, 2, m.num_kv_heads, m.head_dim), np.float32)
    for emb in calibration_sequences(be):
        be.reset()
        be.forward(emb, 0)
        cache = [np.asarray(p.numpy() if hasattr(p, "numpy") else p, np.float32)[0] for p in be.past]
        for i in range(m.num_layers):  # present_key.i, present_value.i
            amax[i] = np.maximum(amax[i], kv_amax(cache[2 * i], cache[2 * i + 1]))
    return (np.maximum(amax, 1e-4) * MARGIN / 127.0).astype(np.float32)


def write_kv_scales(bundle: Path) -> Path:
    from safetensors.numpy import save_file

    scales = compute_kv_scales(bundle)
    path = Path(bundle) / FILE
    save_file({KEY: scales}, str(path), metadata={"layout": "[layers, 2 (key, value), kv_heads, head_dim]",
                                                   "margin": str(MARGIN)})
    log.info("%s: INT8 KV-cache scales for %d layers", path.name, scales.shape[0])
    return path


def write_kv_scales_isolated(bundle: Path) -> Path:
    """`write_kv_scales` in a fresh interpreter, as the vision export runs: the ONNX Runtime
    session of llm.onnx (weights prepacked, the LM head widened to float32) would otherwise sit
    on top of what the export's tracing left resident, and set the export's peak."""
    import subprocess
    import sys

    level = logging.getLogger().getEffectiveLevel()
    code = ("import logging, sys; logging.basicConfig(level=int(sys.argv[2]), format='%(levelname)s %(name)s: "
            "%(message)s'); from edge_vila.export.kv_scales import write_kv_scales; write_kv_scales(sys.argv[1])")
    r = subprocess.run([sys.executable, "-c", code, str(bundle), str(level)], stdout=subprocess.PIPE, text=True)
    path = Path(bundle) / FILE
    if r.returncode != 0 or not path.is_file():
        raise RuntimeError(f"computing {FILE} failed in its subprocess (exit {r.returncode}; its error is above)")
    return path
