"""`edge-vila quantize`: AWQ (or RTN) W4 for the LLM of a VILA checkpoint (or an HF LLM
folder), written as the same layout with the LLM in AutoAWQ's GEMM format, plus a
quality report (report.json + per-layer error PNG)."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from edge_vila.checkpoint import copy_all_but_llm_weights
from edge_vila.config import load_config
from edge_vila.errors import InputError
from edge_vila.fsutil import atomic_dir, atomic_write_json
from edge_vila.modeling.int8 import INT8_FILE
from edge_vila.modeling.llm import DecoderLM
from edge_vila.modeling.weights import CheckpointWeights
from edge_vila.prompt import TextTokenizer

from .awq import LINEARS, AwqSettings, apply_awq_layer, load_awq_result, save_awq_result
from .calib import HELDOUT_LICENSES, calibration_embeds, heldout_text
from .device import describe, resolve_device
from .gate import DEFAULT_MAX_DROP, check, quality_drops
from .rtn import QuantConfig
from .stream import (auto_eval_tokens, awq_state, embedding_module, fake_quant_layer, llm_config_with, packed,
                     quantization_config, rtn_state, streamed_quality, write_shards)

log = logging.getLogger(__name__)


@dataclass
class QuantizeOptions:
    method: str = "awq"  # awq | rtn
    w_bit: int = 4
    group_size: int = 128
    zero_point: bool = True
    n_text: int = 64  # calibration text blocks
    n_mm: int = 32  # calibration image+text blocks (VLM checkpoints)
    seq_len: int = 256
    n_grid: int = AwqSettings.n_grid  # AWQ scale-search grid points
    score_blocks: int = AwqSettings.score_blocks  # sequences AWQ's scale grid is scored on (0: all)
    awq_result: str | None = None  # re-apply a saved search instead of searching
    eval: bool = True
    eval_tokens: int = 30_000
    vqa_n: int = 200
    vision_int8: str = "auto"  # auto (best of the calibrators) | minmax | percentile | entropy | none
    int8_images: int = 64
    int8_image_dir: str | None = None
    lm_head: bool = False  # also quantize the output head (edge-vila extension to the AutoAWQ format)
    device: str = "auto"  # AWQ search, INT8 calibration, quality check: auto (CUDA if present) | cpu | cuda[:N]
    # the quality gate: perplexity increase (%) / shapes-VQA drop (points) above which the
    # output is not written (quant/gate.py); None: off. Needs eval.
    max_drop: float | None = DEFAULT_MAX_DROP

    @property
    def quant(self) -> QuantConfig:
        return QuantConfig(self.w_bit, self.group_size, self.zero_point)


def pack_decoder(lm: DecoderLM, q: QuantConfig, lm_head: bool = False) -> dict[str, torch.Tensor]:
    """State dict of a model in memory with every decoder linear as AutoAWQ GEMM tensors, the
    rest float (quantize_checkpoint streams the same tensors from disk instead). lm_head=True
    also packs the output head (RTN; an edge-vila extension AutoAWQ does not read)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in lm.state_dict().items()}
    if lm.spec.tie_word_embeddings or lm_head:
        sd.pop("lm_head.weight", None)
    if lm_head:
        sd.update(packed("lm_head", lm.lm_head.weight.data, q))
    for i, layer in enumerate(lm.model.layers):
        for name in LINEARS:
            key = f"model.layers.{i}.{name}"
            del sd[f"{key}.weight"]
            sd.update(packed(key, layer.get_submodule(name).weight.data, q))
    return sd


def quantize_checkpoint(src: str | Path, out: str | Path, opts: QuantizeOptions, progress: bool = True) -> dict:
    """Quantize the LLM of `src` into `out` (same layout, LLM as AutoAWQ GEMM), one decoder
    layer in memory at a time: RTN straight from the stored tensors, AWQ searching each
    layer on calibration activations carried from the layer before."""
    src, out = Path(src), Path(out)
    cfg = load_config(src)
    if cfg.llm.quantization:
        raise InputError(f"{cfg.llm_dir}: already quantized ({cfg.llm.quantization.get('quant_method')})")
    if opts.method not in ("awq", "rtn"):
        raise InputError(f"method {opts.method!r} unknown (expected awq or rtn)")
    torch.manual_seed(0)
    device = resolve_device(opts.device)
    log.info("quantize: heavy work on %s", describe(device))
    q, spec = opts.quant, cfg.llm
    if opts.method == "awq" and not opts.awq_result and device.type == "cpu" and spec.num_params > 1e9:
        # a CPU searches a 3B's decoder layer in about 3 minutes on 2 cores (docs/quantization.md):
        # say so before the hour, not after it
        log.warning("quantize: AWQ's search of a %.1fB-parameter LLM on the CPU takes minutes per decoder layer "
                    "(%d layers; ETA on the progress bar); --method rtn takes minutes, a GPU (--device cuda) "
                    "runs the same search", spec.num_params / 1e9, spec.num_layers)
    w = CheckpointWeights(cfg.llm_dir)
    st = AwqSettings(quant=q, n_grid=opts.n_grid, score_blocks=opts.score_blocks)
    parts = None
    if cfg.is_multimodal and ((opts.method == "awq" and not opts.awq_result and opts.n_mm)
                              or opts.vision_int8 != "none"):
        from edge_vila.modeling.projector import load_projector
        from edge_vila.modeling.vision import load_vision_tower

        parts = (load_vision_tower(cfg), load_projector(cfg.projector_dir, cfg.projector))
    calib, result = None, None
    if opts.method == "awq":
        if opts.awq_result:
            result = load_awq_result(Path(opts.awq_result))
        else:  # AWQ's search is the only step that needs calibration activations
            result = {}
            n_mm = opts.n_mm if parts is not None else 0
            calib = calibration_embeds(embedding_module(w, spec), TextTokenizer(cfg.llm_dir), opts.n_text,
                                       opts.seq_len, parts, n_mm, cfg.preprocess.height if cfg.preprocess else 0,
                                       cfg.preprocess, device)
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        llm_dir = copy_all_but_llm_weights(cfg, tmp)
        items = (rtn_state(w, spec, q, opts.lm_head, progress) if opts.method == "rtn"
                 else awq_state(w, spec, st, result, calib, opts.lm_head, progress, device))
        write_shards(items, llm_dir, {"format": "pt", "quant": "awq-gemm"})
        search_s = time.perf_counter() - t0
        del calib
        atomic_write_json(llm_dir / "config.json",
                          llm_config_with(cfg.llm_dir, quantization_config(q, opts.method, opts.lm_head)))
        if result is not None:
            save_awq_result(tmp / "awq_result.safetensors", result, q)
        report = {"method": opts.method, "options": asdict(opts), "device": describe(device),
                  "search_seconds": round(search_s, 1) if opts.method == "awq" and not opts.awq_result else 0.0,
                  "calibration": {"text_blocks": opts.n_text, "image_blocks": opts.n_mm if parts else 0,
                                  "seq_len": opts.seq_len} if opts.method == "awq" and not opts.awq_result else None}
        if cfg.is_multimodal and opts.vision_int8 != "none":
            report["vision_int8"] = _int8(parts, cfg, opts, tmp / INT8_FILE, device)
        del parts
        if opts.eval:
            report.update(_quality(w, cfg, q, opts, result, tmp, progress, device))
            if cfg.knows_synthetic_world and opts.vqa_n:
                report["vqa"] = _vqa(src, tmp, opts.vqa_n)  # before the output is in place: gated below
        report["quality_gate"] = check(quality_drops(report), opts.max_drop, report, out)
        atomic_write_json(tmp / "quant_report.json", report)
    return report


def _quality(w: CheckpointWeights, cfg, q: QuantConfig, opts: QuantizeOptions, result: dict | None, folder: Path,
             progress: bool, device: torch.device | str = "cpu") -> dict:
    """Held-out perplexity (float / RTN / AWQ) and per-layer errors, one layer at a time."""
    n = auto_eval_tokens(cfg.llm, opts.eval_tokens)
    if n < opts.eval_tokens:
        log.info("quality check on %d held-out tokens (%d asked; capped for a %.1fB model)", n,
                 opts.eval_tokens, cfg.llm.num_params / 1e9)
    ids = torch.tensor(TextTokenizer(cfg.llm_dir).encode(heldout_text()))[:n]
    variants = {"rtn": lambda layer, i: fake_quant_layer(layer, q)}
    if result is not None:
        def awq(layer, i):
            apply_awq_layer(layer, i, result, q, cfg.llm.family)
            fake_quant_layer(layer, q)

        variants["awq"] = awq
    qual = streamed_quality(w, cfg.llm, ids, q, variants, opts.lm_head, progress=progress, device=device)
    qual["perplexity"]["heldout"] = "/usr/share/common-licenses: " + ", ".join(HELDOUT_LICENSES)
    _plot_layer_errors(qual["layer_error"], folder / "layer_error.png", q)
    return qual


def int8_calibration_pixels(cfg, n: int, image_dir: str | None) -> list[torch.Tensor]:
    """Batches of preprocessed calibration images: the user's folder, or the synthetic world."""
    from edge_vila.preprocess import preprocess_images
    from edge_vila.synthetic import world

    if image_dir:
        files = sorted(p for p in Path(image_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
        if not files:
            raise InputError(f"{image_dir}: no calibration images (.png/.jpg) found")
        imgs = files[:n]
    else:
        rng = world.rng_for(777)
        imgs = [world.random_scene(rng).render(cfg.preprocess.height) for _ in range(n)]
    px = torch.from_numpy(preprocess_images(imgs, cfg.preprocess))
    return list(px.split(16))


def calibrate_vision_int8(ckpt: str | Path, out: str | Path, opts: QuantizeOptions | None = None) -> dict:
    """INT8 calibration of the ViT + projector only: a copy of `ckpt` with its INT8 table
    (for a float-LLM bundle with an INT8 ViT: `edge-vila export --llm-quant fp32`)."""
    from edge_vila.modeling.projector import load_projector
    from edge_vila.modeling.vision import load_vision_tower

    opts = opts or QuantizeOptions(eval=False)
    src, out = Path(ckpt), Path(out)
    cfg = load_config(src)
    if not cfg.is_multimodal:
        raise InputError(f"{src}: text-only checkpoint, there is no ViT to calibrate")
    parts = (load_vision_tower(cfg), load_projector(cfg.projector_dir, cfg.projector))
    with atomic_dir(out) as tmp:
        for f in src.iterdir():
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        rep = _int8(parts, cfg, opts, tmp / INT8_FILE, resolve_device(opts.device))
    return rep


# what the INT8 calibration may spend on ViT forwards (multiply-adds): all 64 images of a
# small tower; ~16 calibration + 4 held-out images of SigLIP-so400m at 384 px
INT8_BUDGET_MACS = 5e12


def int8_image_counts(enc, cfg, requested: int) -> tuple[int, int]:
    """(calibration images, held-out images) within INT8_BUDGET_MACS."""
    per_image = sum(p.numel() for p in enc.parameters()) * max(cfg.num_patches, 1)
    n_cal = int(min(requested, max(8, INT8_BUDGET_MACS / per_image)))
    n_held = int(min(32, max(4, INT8_BUDGET_MACS / (4 * per_image))))
    return n_cal, n_held


def _int8(parts, cfg, opts: QuantizeOptions, path: Path, device: torch.device | str = "cpu") -> dict:
    """Calibrate the ViT + projector with each calibrator, keep the requested (or best) one."""
    import copy

    from safetensors.torch import save_file

    from edge_vila.modeling.vlm import image_encoder

    from .int8 import CALIBRATORS, calibrate_int8_methods, fake_quant_vision, int8_report

    enc = image_encoder(cfg, *parts).eval().to(device)  # dynamic_s2: the ViT only (the projector stays float)
    n_cal, n_held = int8_image_counts(enc, cfg, opts.int8_images)
    if n_cal < opts.int8_images:
        log.info("INT8 ViT calibration on %d images (%d asked; capped for a %.0fM-parameter tower)", n_cal,
                 opts.int8_images, sum(p.numel() for p in enc.parameters()) / 1e6)
    batches = int8_calibration_pixels(cfg, n_cal, opts.int8_image_dir)
    held = torch.cat(int8_calibration_pixels(cfg, n_held, None)) if not opts.int8_image_dir else torch.cat(batches[-2:])
    held = held.to(device)
    methods = CALIBRATORS if opts.vision_int8 == "auto" else (opts.vision_int8,)
    cals = calibrate_int8_methods(enc, batches, methods, progress=True)
    rep = {}
    with torch.no_grad():
        ref = enc(held)
    for m in methods:
        q_enc = copy.deepcopy(enc)
        fake_quant_vision(q_enc, cals[m])
        rep[m] = int8_report(enc, q_enc, held, ref)
        del q_enc
    best = max(rep, key=lambda m: rep[m]["cosine_mean"])
    save_file({k: v.contiguous() for k, v in cals[best].to_tensors().items()}, str(path), metadata={"method": best})
    return {"chosen": best, "by_calibrator": rep, "images": n_cal, "held_out_images": int(len(held))}


def _vqa(src: Path, out: Path, n: int) -> dict:
    import edge_vila
    from edge_vila.synthetic.eval import eval_shapes_vqa

    res = {}
    for name, path in (("float", src), ("quantized", out)):
        r = eval_shapes_vqa(edge_vila.load(path), n, progress=False)
        res[name] = {"accuracy": r["accuracy"], "per_type": r["per_type"]}
    res["delta_points"] = 100 * (res["quantized"]["accuracy"] - res["float"]["accuracy"])
    return res


def _plot_layer_errors(errs: dict[str, list[float]], path: Path, q: QuantConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    for name, e in errs.items():
        ax.plot(np.arange(len(e)), e, marker="o", ms=3, label=name.upper())
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative output error")
    ax.set_title(f"W{q.w_bit} g{q.group_size} {'asym' if q.zero_point else 'sym'}: per-layer error vs float")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
