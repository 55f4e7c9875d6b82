"""`edge-vila export`: checkpoint -> bundle (see edge_vila/bundle.py for the layout)."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from edge_vila import __version__
from edge_vila.bundle import FORMAT, FORMAT_VERSION, Manifest
from edge_vila.config import TINYCHAT, load_config
from edge_vila.errors import InputError
from edge_vila.options import DEFAULT_CONTEXT
from edge_vila.fsutil import work_dir, atomic_dir, atomic_write_json, release_freed_memory, sha256_file
from edge_vila.modeling.int8 import INT8_FILE, load_int8
from edge_vila.modeling.weights import CheckpointWeights, SafetensorsWriter
from edge_vila.prompt import TextTokenizer, get_template, guess_template

from edge_vila.quant.gate import DEFAULT_MAX_DROP, bundle_drops, check, quality_drops

from .graph_quant import quantize_vision_int8
from .llm_onnx import export_llm, io_names
from .vision_onnx import export_projector, export_vision

log = logging.getLogger(__name__)

LLM_QUANTS = ("awq-w4", "fp32")
VISION_QUANTS = ("int8", "fp32")


@dataclass
class ExportOptions:
    llm_quant: str = "awq-w4"
    vision_quant: str = "int8"
    max_context: int = DEFAULT_CONTEXT
    group_size: int = 128
    check_trt: str = "10.3"
    report: bool = True
    report_n: int = 200
    template: str | None = None  # overrides the checkpoint's (or VILA's by-name) chat template
    quant_method: str = "awq"  # how a float LLM is quantized on the way: awq | rtn
    kv_dtype: str = "fp16"  # llm.onnx's past/present K/V: fp16 (an Orin's cache) | fp32
    embed_dtype: str = "auto"  # embed.safetensors: auto (fp16 for a bf16/fp16 checkpoint, exact) | fp16 | fp32
    head_dtype: str = "auto"  # llm.onnx's float LM head, same rule (the 8B's head: 2.1 GB fp32, 1.05 GB fp16)
    device: str = "auto"  # where a float checkpoint's quantization on the way runs: auto | cpu | cuda[:N]
    # quality gate (quant/gate.py): held-out perplexity increase (%) of the quantization on the
    # way (or the checkpoint's own quant_report.json) and the bundle's shapes-VQA drop (points)
    max_drop: float | None = DEFAULT_MAX_DROP


def _ignore_exporter_warnings() -> None:
    """torch.export's own deprecation and naming notices: about its internals, not the user's model."""
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*axis name.*will not be used", category=UserWarning)


@contextlib.contextmanager
def _quiet():
    """torch.onnx's exporter prints progress to stdout and logs every pass at INFO; keep
    the CLI output readable (everything still goes to the debug log)."""
    buf = io.StringIO()
    noisy = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx",
                                            "torch.onnx._internal.exporter._registration")]
    levels = [lg.level for lg in noisy]
    for lg in noisy:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buf), warnings.catch_warnings():
            _ignore_exporter_warnings()
            yield
    finally:
        for lg, lv in zip(noisy, levels):
            lg.setLevel(lv)
    log.debug(buf.getvalue())


def _ensure_quantized(ckpt: Path, opts: ExportOptions, work: Path) -> Path:
    """Quantize on the fly (issue #4's AWQ + INT8 calibration) when the checkpoint is float;
    an official AWQ build (TinyChat .pt) is converted first, keeping its 4-bit weights."""
    cfg = load_config(ckpt)
    if (cfg.llm.quantization or {}).get("version") == TINYCHAT:
        from edge_vila.quant.tinychat import convert_tinychat_checkpoint

        log.info("converting the official AWQ build %s (TinyChat .pt) without re-quantizing", ckpt)
        ckpt = convert_tinychat_checkpoint(ckpt, work / "converted")
        cfg = load_config(ckpt)
    need_llm = opts.llm_quant == "awq-w4" and not cfg.llm.quantization
    need_vit = cfg.is_multimodal and opts.vision_quant == "int8" and not (ckpt / INT8_FILE).is_file()
    if not (need_llm or need_vit):
        return ckpt
    from edge_vila.quant.quantize import QuantizeOptions, calibrate_vision_int8, quantize_checkpoint

    # the gate's perplexity is measured while quantizing; its VQA on the bundle (export's report)
    q = QuantizeOptions(group_size=opts.group_size, eval=need_llm and opts.max_drop is not None, vqa_n=0,
                        eval_tokens=8192,  # enough to see a lossy quantization, a fraction of a 3B's pass
                        method=opts.quant_method, device=opts.device, max_drop=None)  # gated by export
    if not need_llm:  # a float or already-quantized LLM: calibrate the ViT alone
        log.info("calibrating the INT8 ViT of %s before export", ckpt)
        calibrate_vision_int8(ckpt, work / "quantized", q)
        return work / "quantized"
    log.info("quantizing %s (%s W4 g%d%s) before export", ckpt, opts.quant_method.upper(), opts.group_size,
             " + INT8 ViT" if need_vit else "")
    quantize_checkpoint(ckpt, work / "quantized", q, progress=True)
    return work / "quantized"


def sixteen_bit(weights: CheckpointWeights, key: str, dtype: str, what: str, t: torch.Tensor | None = None,
                rows: int = 8192) -> str:
    """"fp16" or "fp32" for tensor `key` written as `what`. float16 halves its bytes (on disk
    and in an Orin's shared memory) and is exact for a bf16 or fp16 checkpoint's values in
    fp16's range (bf16 has 8 mantissa bits, fp16 11; only |x| < 6e-5 loses bits, to 6e-8
    absolute), so `auto` takes it for those and keeps float32 for a float32 checkpoint (where
    fp16 would round every value). A tensor with values beyond fp16's range stays float32.
    The tensor (`t`, if the caller has read it) is read only for that range check."""
    if dtype not in ("auto", "fp16", "fp32"):
        raise InputError(f"{what} dtype {dtype!r} unknown (expected auto, fp16 or fp32)")
    half = weights.dtype(key) in (torch.bfloat16, torch.float16)
    want = dtype if dtype != "auto" else ("fp16" if half else "fp32")
    if want == "fp16":
        t = weights.get(key) if t is None else t
        peak = max((float(t[i:i + rows].abs().max()) for i in range(0, t.shape[0], rows)), default=0.0)
        if peak >= 65504:
            log.warning("%s kept float32: %s holds values up to %.3g, beyond float16", what, key, peak)
            want = "fp32"
    return want


def _write_embeddings(weights: CheckpointWeights, path: Path, dtype: str = "auto", rows: int = 8192) -> str:
    """The host's token-embedding table, in `sixteen_bit`'s dtype; returns the dtype written."""
    import numpy as np

    t = weights.get("model.embed_tokens.weight")
    want = sixteen_bit(weights, "model.embed_tokens.weight", dtype, "embed.safetensors", t, rows)
    table = np.empty(tuple(t.shape), np.float16 if want == "fp16" else np.float32)
    for i in range(0, t.shape[0], rows):  # convert in slices: no whole float32 copy of the table
        table[i:i + rows] = t[i:i + rows].float().numpy()
    del t
    with SafetensorsWriter(path) as wr:
        wr.add("embed_tokens", table)
    return want


def _head_dtype(weights: CheckpointWeights, spec, dtype: str) -> str:
    """llm.onnx's float LM head: fp16 | fp32 (`sixteen_bit`), or int4 for a quantized head."""
    if "lm_head.qweight" in weights:
        return "int4"
    return sixteen_bit(weights, weights.head_name(spec.tie_word_embeddings), dtype, "llm.onnx's LM head")


def export_bundle(ckpt: str | Path, out: str | Path, opts: ExportOptions | None = None) -> Path:
    opts = opts or ExportOptions()
    if opts.llm_quant not in LLM_QUANTS:
        raise InputError(f"--llm-quant {opts.llm_quant!r} (expected one of {LLM_QUANTS})")
    if opts.vision_quant not in VISION_QUANTS:
        raise InputError(f"--vision-quant {opts.vision_quant!r} (expected one of {VISION_QUANTS})")
    ckpt, out = Path(ckpt), Path(out)
    t0 = time.perf_counter()
    with work_dir(out) as work:  # beside the bundle: a killed export's leftovers are cleaned by the next
        src = _ensure_quantized(ckpt, opts, work) if (opts.llm_quant != "fp32" or opts.vision_quant != "fp32") else ckpt
        gate = _gate_quantized(src, opts, out)  # before hours of export work, not after
        cfg = load_config(src)
        if opts.llm_quant == "fp32" and cfg.llm.quantization:
            raise InputError(f"{src}: LLM is quantized; export it with --llm-quant awq-w4")
        max_ctx = min(opts.max_context, cfg.llm.max_position_embeddings)
        tok = TextTokenizer(cfg.llm_dir)
        name = opts.template or cfg.chat_template
        template = get_template(name) if name else guess_template(tok, tok.jinja)
        with atomic_dir(out) as tmp:
            weights = CheckpointWeights(cfg.llm_dir)
            log.info("writing llm.onnx (%d layers, %s)", cfg.llm.num_layers,
                     "INT4 AWQ" if cfg.llm.quantization else "float32")
            head_dtype = _head_dtype(weights, cfg.llm, opts.head_dtype)
            with _quiet():
                res = export_llm(cfg.llm, weights, tmp / "llm.onnx", max_ctx, kv_dtype=opts.kv_dtype,
                                 head_dtype=head_dtype)
            if cfg.llm.quantization:
                log.info("llm.onnx: %d linears as INT4 block-%d DequantizeLinear", res["int4_linears"],
                         cfg.llm.quantization["group_size"])
            _write_embeddings(weights, tmp / "embed.safetensors", opts.embed_dtype)
            del weights
            tok.save(tmp)
            for extra in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
                if (cfg.llm_dir / extra).is_file():
                    shutil.copy2(cfg.llm_dir / extra, tmp / extra)
            release_freed_memory()
            vision_quant = None
            if cfg.is_multimodal:
                vision_quant = _write_vision_isolated(cfg, src, tmp / "vision.onnx", opts)
            files = sorted(p.name for p in tmp.iterdir() if p.is_file())
            manifest = _manifest(cfg, template, max_ctx, opts, vision_quant, tmp, files, ckpt, head_dtype)
            atomic_write_json(tmp / "manifest.json", manifest.to_dict())
            if cfg.llm.quantization:  # the CPU runtime's INT8 KV cache: scales from this very bundle
                from .kv_scales import write_kv_scales_isolated

                kv = write_kv_scales_isolated(tmp)
                manifest = dataclasses.replace(manifest, files=dict(sorted({**manifest.files,
                                                                            kv.name: sha256_file(kv)}.items())))
                atomic_write_json(tmp / "manifest.json", manifest.to_dict())
            if opts.check_trt:
                from .trt_check import check_bundle

                res = check_bundle(tmp, opts.check_trt)
                atomic_write_json(tmp / "trt_check.json", res)
            rep = {}
            if opts.report:  # while the (possibly temporary) quantized reference still exists
                from .report import bundle_report

                rep = bundle_report(ckpt if cfg.is_multimodal else src, tmp, n=opts.report_n, quantized_ref=src)
                rep["bundle"] = str(out)
            rep["quality_gate"] = check({**gate.get("drops", {}), **bundle_drops(rep)}, opts.max_drop, rep, out)
            atomic_write_json(tmp / "report.json", rep)
        log.info("exported %s in %.0f s", out, time.perf_counter() - t0)
    return out


def _gate_quantized(src: Path, opts: ExportOptions, out: Path) -> dict:
    """The quality gate on the quantized LLM's held-out perplexity increase (its quant_report.json:
    the quantization on the way, or the one a quantized checkpoint brings)."""
    qrep_path = src / "quant_report.json"
    qrep = json.loads(qrep_path.read_text()) if qrep_path.is_file() else {}
    drops = quality_drops({k: qrep.get(k) for k in ("perplexity", "method")})
    return check(drops, opts.max_drop, {"source": str(src), **{k: qrep.get(k) for k in
                                                                ("method", "perplexity", "layer_error")}}, out)


def _write_vision_isolated(cfg, src: Path, path: Path, opts: ExportOptions) -> dict:
    """_write_vision in a fresh interpreter: torch.export keeps the traced tower's float
    weights alive after the export returns (measured: 2 GB of SigLIP-so400m still resident
    after gc and malloc_trim), and the export report that follows needs that memory. A
    subprocess, not multiprocessing: spawn would re-import the caller's __main__ script."""
    import subprocess
    import sys
    from dataclasses import asdict

    result = path.with_name(path.name + ".result.json")
    job = json.dumps({"src": str(src), "path": str(path), "opts": asdict(opts), "result": str(result),
                      "level": logging.getLogger().getEffectiveLevel()})
    r = subprocess.run([sys.executable, "-c", "import sys; from edge_vila.export.bundle import _vision_child; "
                        "_vision_child(sys.argv[1])", job], stdout=subprocess.PIPE, stderr=None, text=True)
    out = json.loads(result.read_text()) if result.is_file() else None
    result.unlink(missing_ok=True)
    if out is not None and "error" in out:  # a one-line input error from the child: the same one here
        raise InputError(out["error"])
    if r.returncode != 0 or out is None:
        raise RuntimeError(f"writing {path.name} failed in its subprocess (exit {r.returncode}; its error is above)")
    return out


def _vision_child(job_json: str) -> None:
    job = json.loads(job_json)
    logging.basicConfig(level=job["level"], format="%(levelname)s %(name)s: %(message)s")
    _ignore_exporter_warnings()
    from edge_vila.errors import EdgeVilaError

    src = Path(job["src"])
    try:
        res = _write_vision(load_config(src), src, Path(job["path"]), ExportOptions(**job["opts"]))
    except EdgeVilaError as e:
        res = {"error": str(e)}
    Path(job["result"]).write_text(json.dumps(res))


def _write_vision(cfg, src: Path, path: Path, opts: ExportOptions) -> dict:
    from edge_vila.modeling.projector import load_projector
    from edge_vila.modeling.vision import load_vision_tower
    from edge_vila.modeling.vlm import image_encoder

    vt = load_vision_tower(cfg)
    pj = load_projector(cfg.projector_dir, cfg.projector)
    enc = image_encoder(cfg, vt, pj).eval()
    with _quiet():
        export_vision(enc, path, (cfg.preprocess.height, cfg.preprocess.width))
        if cfg.preprocess.s2:  # the projector runs after the host's S2 merge: its own graph, float
            export_projector(pj.eval(), path.with_name("projector.onnx"), cfg.num_patches, cfg.projector.in_dim)
    if opts.vision_quant != "int8":
        return {"vision": "fp32"}
    cal = load_int8(src / INT8_FILE)
    from edge_vila.modeling.int8 import quantizable

    weights = {n: m.weight.detach().float().numpy() for n, m in quantizable(enc).items()}
    model, n = quantize_vision_int8(onnx.load(str(path)), weights, cal.act_scale,
                                    {k: v.numpy() for k, v in cal.weight_scale.items()})
    if n != len(cal.act_scale):
        log.info("vision.onnx: %d of %d calibrated layers are in the graph (the rest feed outputs VILA does not "
                 "use, e.g. SigLIP's pooling head, and were pruned by the exporter)", n, len(cal.act_scale))
    # the float export may have put its weights in vision.onnx.data; the INT8 graph is a
    # quarter of that and fits in one file, so the float data file must not linger
    path.with_name(path.name + ".data").unlink(missing_ok=True)
    onnx.save(model, str(path))
    return {"vision": "int8", "calibrator": cal.method, "quantized_layers": n}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"edge_vila": __version__}
    for p in ("torch", "onnx", "onnxruntime", "transformers", "onnxscript"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


def _vision_dims(cfg) -> dict:
    """ViT + projector sizes, so a device can budget memory before loading (jetson/memory.py)."""
    raw = json.loads((cfg.vision_dir / "config.json").read_text())
    raw = raw.get("vision_config", raw)
    v = cfg.vision
    return {"kind": v.kind, "hidden_size": v.hidden_size, "num_layers": v.num_layers,
            "intermediate_size": raw.get("intermediate_size"), "num_heads": raw.get("num_attention_heads"),
            "image_size": v.image_size, "patch_size": v.patch_size, "patches": cfg.num_patches, "projector": cfg.projector.kind,
            "projector_in": cfg.projector.fold ** 2 * cfg.projector.in_dim,
            "projector_channels": cfg.projector.in_dim,  # per patch: vision hidden (x scales in dynamic_s2)
            "projector_mid": 3 * cfg.projector.in_dim if cfg.projector.fold == 3 else 0}


_DTYPE_NAMES = {"fp16": "float16", "fp32": "float32", "int4": "int4"}  # option -> the manifest's name


def _manifest(cfg, template, max_ctx, opts, vision_quant, folder: Path, files: list[str], source: Path,
              head_dtype: str) -> Manifest:
    s = cfg.llm
    q = s.quantization or {}
    tok_eos = TextTokenizer(folder).eos_id
    eos = sorted(set(s.eos_token_ids) | ({tok_eos} if tok_eos is not None else set()))
    man = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"family": s.family, "hidden_size": s.hidden_size, "vocab_size": s.vocab_size,
                  "num_layers": s.num_layers, "num_heads": s.num_heads, "num_kv_heads": s.num_kv_heads,
                  "head_dim": s.head_dim, "intermediate_size": s.intermediate_size,
                  "max_position_embeddings": s.max_position_embeddings, "max_context": max_ctx,
                  "bos_token_id": s.bos_token_id, "eos_token_ids": eos, "params": s.num_params,
                  "tie_word_embeddings": s.tie_word_embeddings},
        "template": {"name": template.name, "system": template.system},
        "image_token": "<image>",
        "tokens_per_image": cfg.tokens_per_image if cfg.is_multimodal else 0,  # per vision input (tile)
        "image_tokens": dataclasses.asdict(cfg.image_tokens) if cfg.is_multimodal else None,
        "vision_dims": _vision_dims(cfg) if cfg.is_multimodal else None,
        "num_video_frames": cfg.num_video_frames if cfg.is_multimodal else None,
        "preprocess": cfg.preprocess.__dict__ if cfg.is_multimodal else None,
        "quant": {"llm": "awq-w4" if q else "fp32", "group_size": q.get("group_size"), "zero_point": q.get("zero_point"),
                  "int4_encoding": "symmetric INT4 block DQ + exact zero-point correction" if q else None,
                  **(vision_quant or {})},
        "io": {"llm": dict(zip(("inputs", "outputs"), io_names(s.num_layers)), kv_layout="[1, kv_heads, seq, head_dim]",
                       kv_dtype=_DTYPE_NAMES[opts.kv_dtype], head_dtype=_DTYPE_NAMES[head_dtype]),
               "vision": {"inputs": ["pixels"], "outputs": ["image_features" if cfg.preprocess.s2 else "image_embeds"]}
               if cfg.is_multimodal else None,
               **({"projector": {"inputs": ["image_features"], "outputs": ["image_embeds"]}}
                  if cfg.is_multimodal and cfg.preprocess.s2 else {})},
        "toolchain": _versions(),
        "source": str(source),
    }
    man["files"] = {f: sha256_file(folder / f) for f in files if f != "manifest.json"}
    return Manifest.from_dict(man, folder / "manifest.json")  # what export writes passes the reader's checks


__all__ = ["ExportOptions", "export_bundle"]
