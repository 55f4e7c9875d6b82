"""Decode speed, side by side in one run: the edge-vila bundle (ONNX Runtime backend) vs
transformers fp32 eager on the same HF model, onnxruntime-genai's int4 build (--genai) and
llama.cpp on a Q4 GGUF of the same model (--gguf).

    python benchmarks/decode_speed.py --hf HF_LLM_DIR --bundle BUNDLE [--genai DIR] [--gguf FILE]
        [--contexts 64 512 1024] [--runs 5] [--compare-kv] [--compare-attention] [--compare-matmul]

Reports tokens/s (median of --runs, and every run's figure for the spread; edge-vila's runs
interleaved across contexts and variants, each peer's runs back to back)
for a decode of --new tokens after a prompt padded to
each context length, the ratios, and writes JSON + a PNG next to --out. Not a test: timing
depends on the machine; the machine is recorded in the JSON.

--paired-bandwidth measures the copy bandwidth (roofline.py's STREAM-style copy, 1 GB, best of
5 passes) right before every timed run and records (tokens/s, GB/s) pairs, so roofline.py can set each run
against the bandwidth of its own moment: this shared host's bandwidth moves by 1.5x within
minutes, and a bound measured at another time than the decode says more about the spell than
about the runtime.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

PAIRED: dict | None = None  # system -> context -> [(tok/s, GB/s)], with --paired-bandwidth
RAW: dict = {}  # system -> context -> every timed run's tok/s (the spread beside each median)
PIPES: dict = {}  # edge-vila variant -> its loaded pipeline (perplexity reuses them)


def heldout_ids(tok_encode, n: int) -> list[int]:
    """n tokens of text no model here was tuned on (edge_vila.synthetic's held-out paragraphs)."""
    from edge_vila.synthetic.textdata import heldout_text

    ids: list[int] = []
    for para in heldout_text(200):
        ids += tok_encode(" " + para)
        if len(ids) >= n:
            return ids[:n]
    return ids


def _nll(logits: np.ndarray, target: int) -> float:
    z = logits.astype(np.float64)
    m = z.max()
    return float(m + np.log(np.exp(z - m).sum()) - z[target])


def ppl_edge(pipe, ids: list[int]) -> float:
    """Teacher-forced, one token at a time through the decode path that is timed."""
    be = pipe.backend
    be.reset()
    nll = 0.0
    for i in range(len(ids) - 1):
        logits = be.forward(be.embed(np.asarray(ids[i:i + 1])), i)
        nll += _nll(np.asarray(logits).reshape(-1), ids[i + 1])
    return float(np.exp(nll / (len(ids) - 1)))


def ppl_llamacpp(gguf: Path, ids: list[int]) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=len(ids) + 16, n_threads=os.cpu_count(), n_batch=512, logits_all=True,
                verbose=False)
    llm.reset()
    llm.eval(ids)
    scores = np.asarray(llm.scores[:len(ids)])
    return float(np.exp(np.mean([_nll(scores[i], ids[i + 1]) for i in range(len(ids) - 1)])))


def ppl_hf(hf: Path, ids: list[int]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    return float(np.exp(np.mean([_nll(logits[i], ids[i + 1]) for i in range(len(ids) - 1)])))


def _median(system: str, ctx: int, rates: list[float]) -> float:
    RAW.setdefault(system, {})[str(ctx)] = [round(r, 2) for r in rates]
    return statistics.median(rates)


def _bandwidth() -> float | None:
    if PAIRED is None:
        return None
    from roofline import stream_copy_gbps  # same folder: the same estimator as roofline.py's bound

    time.sleep(0.05)  # the run's threads (ours, ORT's, llama.cpp's) stop spinning first
    return stream_copy_gbps(passes=5)


def _record(system: str, ctx: int, tok_s: float, gbps: float | None) -> None:
    if gbps is not None:
        PAIRED.setdefault(system, {}).setdefault(str(ctx), []).append((tok_s, gbps))


def _ids(tok, n: int) -> list[int]:
    text = " ".join(["the robot sees a red circle on the left and a blue square on the top."] * (n // 8 + 2))
    return tok.encode(text)[:n]


def bench_edge(bundle: Path, contexts: list[int], new: int, runs: int,
               variants: dict[str, dict]) -> tuple[dict[str, dict[int, float]], dict[str, dict]]:
    """Median decode tokens/s of each edge-vila variant (name -> `edge_vila.load` options) at
    each context, and what each variant chose (KV cache type, attention kernel).

    Runs are interleaved (round r: every context, every variant) so a slow spell of this
    shared machine hits all of them alike instead of one context or one variant; the
    context ratios and variant ratios are what the figures compare."""
    import edge_vila

    pipes = {name: edge_vila.load(opts.get("bundle", bundle), max_context=max(max(contexts) + new + 8, 128),
                                  **{k: v for k, v in opts.items() if k != "bundle"})
             for name, opts in variants.items()}
    global PIPES
    PIPES = pipes
    chose = {name: {"kv_cache": getattr(p.backend, "kv_cache", "fp32"),
                    "attention": getattr(p.backend, "attention", None),
                    "matmul": getattr(p.backend, "matmul", None)} for name, p in pipes.items()}
    rates: dict[str, dict[int, list[float]]] = {name: {c: [] for c in contexts} for name in pipes}
    tok = next(iter(pipes.values())).tokenizer  # one bundle: the same tokenizer and prompts for all
    prompts = {ctx: np.asarray(_ids(tok, ctx)) for ctx in contexts}
    for r in range(runs + 1):  # round 0 warms up
        for ctx in contexts:
            for name, pipe in pipes.items():
                be = pipe.backend
                be.reset()
                logits = be.forward(be.embed(prompts[ctx]), 0)
                pos = len(prompts[ctx])
                gbps = _bandwidth() if r else None
                t0 = time.perf_counter()
                for _ in range(new):
                    tok = int(np.argmax(logits))
                    logits = be.forward(be.embed(np.asarray([tok])), pos)
                    pos += 1
                if r:
                    rates[name][ctx].append(new / (time.perf_counter() - t0))
                    _record(name, ctx, rates[name][ctx][-1], gbps)
    return {n: {c: _median(n, c, v) for c, v in per.items()} for n, per in rates.items()}, chose


def bench_hf(hf: Path, ctx: int, new: int, runs: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([_ids(tok, ctx)])
    rates = []
    with torch.inference_mode():
        for _ in range(runs + 1):
            out = model(ids, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(new):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            rates.append(new / (time.perf_counter() - t0))
    return _median("transformers_fp32_eager", ctx, rates[1:])


def bench_genai(folder: Path, hf: Path, ctx: int, new: int, runs: int) -> float:
    """onnxruntime-genai's own int4 build of the same HF folder:
    python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu"""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    model = og.Model(str(folder))
    ids = _ids(AutoTokenizer.from_pretrained(str(hf)), ctx)
    rates = []
    for r in range(runs + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ctx + new + 2, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        gen.generate_next_token()  # first token: end of prefill
        gbps = _bandwidth() if r else None
        t0 = time.perf_counter()
        for _ in range(new):
            gen.generate_next_token()
        rates.append(new / (time.perf_counter() - t0))
        _record("onnxruntime_genai_int4", ctx, rates[-1], gbps)  # gbps is None for the warm-up run
    return _median("onnxruntime_genai_int4", ctx, rates[1:])


def bench_llamacpp(gguf: Path, hf: Path, ctx: int, new: int, runs: int) -> float:
    """llama.cpp (llama-cpp-python, built from PyPI's source) on a Q4 GGUF of the same model."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    ids = _ids(AutoTokenizer.from_pretrained(str(hf)), ctx)
    llm = Llama(model_path=str(gguf), n_ctx=ctx + new + 16, n_threads=os.cpu_count(), n_batch=512, verbose=False)
    rates = []
    for r in range(runs + 1):
        llm.reset()
        llm.eval(ids)
        tok = llm.sample(temp=0.0)
        gbps = _bandwidth() if r else None
        t0 = time.perf_counter()
        for _ in range(new):
            llm.eval([tok])
            tok = llm.sample(temp=0.0)
        rates.append(new / (time.perf_counter() - t0))
        _record("llama_cpp_q4", ctx, rates[-1], gbps)  # gbps is None for the warm-up run
    return _median("llama_cpp_q4", ctx, rates[1:])


SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8",
              "asimd", "asimddp", "sve", "i8mm")


def machine() -> dict:
    """The CPU the figures are from: model, the SIMD flags that pick kernels (ours, ORT's,
    llama.cpp's), cores, and which of our kernels ran."""
    info = {"arch": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(), "cpu": None,
            "simd_flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for ln in text.splitlines():
        key, _, val = ln.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "CPU part") and not info["cpu"]:
            info["cpu"] = val.strip()
        if key in ("flags", "Features") and not info["simd_flags"]:
            have = set(val.split())
            info["simd_flags"] = [f for f in SIMD_FLAGS if f in have]
    try:
        from edge_vila.backends import native_ops
        lib = native_ops.build_library()
        info["edge_vila_kernels"] = native_ops.kernels(lib)
        info["edge_vila_kernel"] = native_ops.kernel_in_force(lib)
    except (RuntimeError, OSError) as e:
        info["edge_vila_kernels"] = f"unavailable: {e}"
    return info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True, type=Path)
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--genai", type=Path, default=None, help="onnxruntime-genai build of the same model")
    ap.add_argument("--gguf", type=Path, default=None, help="Q4 GGUF of the same model, for llama.cpp")
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 1024])
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--compare-kv", action="store_true",
                    help="also run edge-vila with an FP32 KV cache (the default CPU graph's is INT8)")
    ap.add_argument("--compare-attention", action="store_true",
                    help="also run edge-vila with ORT's GroupQueryAttention instead of our attention op")
    ap.add_argument("--compare-matmul", action="store_true",
                    help="also run edge-vila with ORT's MatMulNBits instead of our INT4 linear op")
    ap.add_argument("--paired-bandwidth", action="store_true",
                    help="measure the copy bandwidth before every timed run (for roofline.py)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (no ratio vs it)")
    ap.add_argument("--extra-bundle", action="append", default=[], metavar="NAME=PATH",
                    help="another edge-vila bundle of the same model in the same run (e.g. symmetric g32, the "
                         "format of llama.cpp's Q4_0)")
    ap.add_argument("--ppl-tokens", type=int, default=512,
                    help="held-out tokens each system's perplexity is measured on (0: none)")
    ap.add_argument("--kernel", default=None, help="force our ops' kernel: portable, avx2, avx512 or neon")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/decode_speed.json"))
    a = ap.parse_args()
    if a.kernel:  # our ops' kernel, process-wide (e.g. the AVX2 path on an AVX-512 machine)
        from edge_vila.backends import native_ops
        native_ops.use_kernel(native_ops.build_library(), a.kernel)
    res = {"machine": machine(), "new_tokens": a.new, "runs": a.runs, "results": {}}
    print(f"machine: {res['machine']}", flush=True)
    global PAIRED
    if a.paired_bandwidth:
        PAIRED = res["paired_bandwidth"] = {}
    variants = {"edge_vila_ort": {}}
    if a.compare_attention:
        variants["edge_vila_ort_gqa"] = {"attention": "gqa"}
    if a.compare_kv:
        variants["edge_vila_ort_fp32_kv"] = {"kv_cache": "fp32"}
    if a.compare_matmul:
        variants["edge_vila_ort_nbits"] = {"matmul": "nbits"}
    labels = {"edge_vila_ort_gqa": "edge-vila GroupQueryAttention", "edge_vila_ort_fp32_kv": "edge-vila fp32 KV",
              "edge_vila_ort_nbits": "edge-vila MatMulNBits"}
    for spec in a.extra_bundle:
        name, _, path = spec.partition("=")
        variants[f"edge_vila_ort_{name}"] = {"bundle": Path(path)}
        labels[f"edge_vila_ort_{name}"] = f"edge-vila {name}"
    res["bundles"] = {"edge_vila_ort": str(a.bundle), **{n: str(o["bundle"]) for n, o in variants.items() if "bundle" in o}}
    edge, chose = bench_edge(a.bundle, a.contexts, a.new, a.runs, variants)
    res["edge_vila_kv_cache"] = chose["edge_vila_ort"]["kv_cache"]
    res["edge_vila_attention"] = chose["edge_vila_ort"]["attention"]
    res["edge_vila_matmul"] = chose["edge_vila_ort"]["matmul"]
    for ctx in a.contexts:
        row = {name: edge[name][ctx] for name in variants}
        extra = "".join(f" | {labels[n]} {row[n]:7.1f} tok/s" for n in variants if n in labels)
        if not a.no_hf:
            row["transformers_fp32_eager"] = bench_hf(a.hf, ctx, a.new, a.runs)
            row["ratio_vs_transformers"] = row["edge_vila_ort"] / row["transformers_fp32_eager"]
            extra += (f" | transformers fp32 {row['transformers_fp32_eager']:7.1f} tok/s"
                      f" | x{row['ratio_vs_transformers']:.2f}")
        if a.genai:
            row["onnxruntime_genai_int4"] = bench_genai(a.genai, a.hf, ctx, a.new, a.runs)
            row["ratio_vs_genai"] = row["edge_vila_ort"] / row["onnxruntime_genai_int4"]
            extra += f" | genai int4 {row['onnxruntime_genai_int4']:7.1f} tok/s | x{row['ratio_vs_genai']:.2f}"
        if a.gguf:
            row["llama_cpp_q4"] = bench_llamacpp(a.gguf, a.hf, ctx, a.new, a.runs)
            row["ratio_vs_llama_cpp"] = row["edge_vila_ort"] / row["llama_cpp_q4"]
            extra += f" | llama.cpp {row['llama_cpp_q4']:7.1f} tok/s | x{row['ratio_vs_llama_cpp']:.2f}"
        res["results"][str(ctx)] = row
        print(f"context {ctx:5d}: edge-vila {row['edge_vila_ort']:7.1f} tok/s{extra}", flush=True)
    r = res["results"]
    lo, hi = str(min(a.contexts)), str(max(a.contexts))
    res["edge_vila_long_vs_short"] = r[hi]["edge_vila_ort"] / r[lo]["edge_vila_ort"]
    print(f"edge-vila decode at {hi} / at {lo}: {res['edge_vila_long_vs_short']:.2f}")
    if a.compare_attention:
        res["edge_vila_gqa_long_vs_short"] = r[hi]["edge_vila_ort_gqa"] / r[lo]["edge_vila_ort_gqa"]
        print(f"  with GroupQueryAttention: {res['edge_vila_gqa_long_vs_short']:.2f}")
    if a.compare_matmul:
        res["edge_vila_nbits_vs_edge"] = {c: r[c]["edge_vila_ort_nbits"] / r[c]["edge_vila_ort"] for c in r}
        print("  MatMulNBits / our linear op: " + " / ".join(f"{v:.2f}" for v in res["edge_vila_nbits_vs_edge"].values()))
    if a.compare_kv:
        res["edge_vila_fp32_kv_long_vs_short"] = r[hi]["edge_vila_ort_fp32_kv"] / r[lo]["edge_vila_ort_fp32_kv"]
        print(f"  with the FP32 KV cache: {res['edge_vila_fp32_kv_long_vs_short']:.2f}")
    if a.ppl_tokens:  # speed at equal quality: each system's perplexity on the same held-out tokens
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(a.hf))
        ids = heldout_ids(lambda t: tok.encode(t, add_special_tokens=False), a.ppl_tokens)
        ppl = {name: ppl_edge(pipe, ids) for name, pipe in PIPES.items()}
        if a.gguf:
            ppl["llama_cpp_q4"] = ppl_llamacpp(a.gguf, ids)
        if not a.no_hf:
            ppl["transformers_fp32_eager"] = ppl_hf(a.hf, ids)
        res["perplexity"] = {"tokens": len(ids), **{k: round(v, 3) for k, v in ppl.items()}}
        print(f"perplexity on {len(ids)} held-out tokens: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    res["runs_tok_s"] = RAW
    print("spread (min-max tok/s over the timed runs):")
    for system, per in RAW.items():
        print(f"  {system:28s} " + "  ".join(f"{c}: {min(v):.1f}-{max(v):.1f}" for c, v in per.items()))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    _plot(res, a.out.with_suffix(".png"))


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = list(res["results"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for key in ("edge_vila_ort", "edge_vila_ort_nbits", "edge_vila_ort_fp32_kv", "transformers_fp32_eager", "onnxruntime_genai_int4", "llama_cpp_q4"):
        if key not in res["results"][ctx[0]]:
            continue
        ax.plot([int(c) for c in ctx], [res["results"][c][key] for c in ctx], marker="o", label=key)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
