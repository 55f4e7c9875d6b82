"""Decode speed, side by side in one run: edge-vila bundles (ONNX Runtime backend) vs
transformers fp32 eager on the same HF model, onnxruntime-genai's int4 build (--genai) and
llama.cpp on a Q4 GGUF of the same model (--gguf).

    python benchmarks/decode_speed.py --hf HF_LLM_DIR --bundle BUNDLE [--extra-bundle NAME=B2]
        [--genai DIR] [--gguf FILE] [--contexts 64 512 1024] [--runs 5] [--new 64]
        [--compare-kv] [--compare-attention] [--compare-matmul] [--compare-head] [--kernel avx2] [--paired-bandwidth]

Every system runs in a worker process of its own (this script with --worker), loaded once and
kept; the parent sends each the same prompt token ids and asks for one timed decode at a time.
Rounds alternate: round r times every context on every system, the systems' order rotated by
one each round, so a slow spell of this shared machine falls on all of them alike. Round 0 is a
warm-up. Each timed run is a prefill of the context, a 50 ms pause (the threads of the run
before, any system's, stop spinning), then --new greedy decode steps; tokens/s is --new over
those steps' wall time. Reported: the median of --runs rounds, every run's figure (the spread),
the ratios, and each system's perplexity on the same held-out tokens through its own decode
path (speed at equal quality). JSON + PNG next to --out, with the CPU's model and SIMD flags.
Not a test: timing depends on the machine.

--paired-bandwidth measures the copy bandwidth (roofline.py's STREAM-style copy, best of 5
passes) in the parent between each run's prefill and its decode and records (tokens/s, GB/s)
pairs, so roofline.py can set each run against the bandwidth of its own moment.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HF, GENAI, LLAMA = "transformers_fp32_eager", "onnxruntime_genai_int4", "llama_cpp_q4"
PEER_SHORT = {HF: "transformers", GENAI: "genai", LLAMA: "llama_cpp"}
PAUSE_S = 0.05


def heldout_ids(tok_encode, n: int) -> list[int]:
    """n tokens of text no model here was tuned on (edge_vila.synthetic's held-out paragraphs)."""
    from edge_vila.synthetic.textdata import heldout_text

    ids: list[int] = []
    for para in heldout_text(200):
        ids += tok_encode(" " + para)
        if len(ids) >= n:
            return ids[:n]
    return ids


def prompt_ids(tok_encode, n: int) -> list[int]:
    text = " ".join(["the robot sees a red circle on the left and a blue square on the top."] * (n // 8 + 2))
    return tok_encode(text)[:n]


def _nll(logits: np.ndarray, target: int) -> float:
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    m = z.max()
    return float(m + np.log(np.exp(z - m).sum()) - z[target])


# ---- the systems, one per worker process -------------------------------------------------------

class EdgeSystem:
    """An edge-vila bundle through the decode path `edge_vila.load` gives a user."""

    def __init__(self, spec: dict):
        import edge_vila
        from edge_vila.backends import native_ops

        lib = native_ops.build_library()
        if spec.get("kernel"):  # our ops' kernel, process-wide (e.g. the AVX2 path on an AVX-512 machine)
            native_ops.use_kernel(lib, spec["kernel"])
        self.pipe = edge_vila.load(spec["bundle"], max_context=spec["max_context"], **spec.get("opts", {}))
        be = self.pipe.backend
        self.info = {"kv_cache": getattr(be, "kv_cache", "fp32"), "attention": getattr(be, "attention", None),
                     "matmul": getattr(be, "matmul", None), "lm_head": getattr(be, "lm_head", None),
                     "kernel": native_ops.kernel_in_force(lib)}

    def prefill(self, ids: list[int], new: int) -> None:
        be = self.pipe.backend
        be.reset()
        self.logits, self.pos = be.forward(be.embed(np.asarray(ids)), 0), len(ids)

    def decode(self, new: int) -> None:
        be = self.pipe.backend
        for _ in range(new):
            self.logits = be.forward(be.embed(np.asarray([int(np.argmax(self.logits))])), self.pos)
            self.pos += 1

    def ppl(self, ids: list[int]) -> float:
        """Teacher-forced, one token at a time through the decode path that is timed."""
        be = self.pipe.backend
        be.reset()
        nll = sum(_nll(be.forward(be.embed(np.asarray(ids[i:i + 1])), i), ids[i + 1]) for i in range(len(ids) - 1))
        return float(np.exp(nll / (len(ids) - 1)))


class HfSystem:
    def __init__(self, spec: dict):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=torch.float32,
                                                          attn_implementation="eager").eval()
        self.info = {"torch_threads": torch.get_num_threads()}

    def prefill(self, ids: list[int], new: int) -> None:
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([ids]), use_cache=True)
        self.past, self.nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def decode(self, new: int) -> None:
        with self.torch.inference_mode():
            for _ in range(new):
                out = self.model(self.nxt, past_key_values=self.past, use_cache=True)
                self.past, self.nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def ppl(self, ids: list[int]) -> float:
        with self.torch.inference_mode():
            logits = self.model(self.torch.tensor([ids])).logits[0].numpy()
        return float(np.exp(np.mean([_nll(logits[i], ids[i + 1]) for i in range(len(ids) - 1)])))


class GenaiSystem:
    """onnxruntime-genai's own int4 build of the same HF folder:
    python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu"""

    def __init__(self, spec: dict):
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(spec["path"])
        self.info = {"version": getattr(og, "__version__", None)}

    def _generator(self, max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return self.og.Generator(self.model, params)

    def prefill(self, ids: list[int], new: int) -> None:
        self.gen = self._generator(len(ids) + new + 2)
        self.gen.append_tokens(ids)
        self.gen.generate_next_token()  # the first token ends the prefill

    def decode(self, new: int) -> None:
        for _ in range(new):
            self.gen.generate_next_token()

    def ppl(self, ids: list[int]) -> float:
        """Teacher-forced: the held-out tokens appended one at a time, the logits read after each."""
        gen = self._generator(len(ids) + 2)
        nll = 0.0
        for i in range(len(ids) - 1):
            gen.append_tokens([ids[i]])
            nll += _nll(gen.get_logits(), ids[i + 1])
        return float(np.exp(nll / (len(ids) - 1)))


class LlamaCppSystem:
    """llama.cpp (llama-cpp-python, built from PyPI's source) on a Q4 GGUF of the same model."""

    def __init__(self, spec: dict):
        from llama_cpp import Llama

        self.Llama, self.path = Llama, spec["path"]
        self.llm = Llama(model_path=self.path, n_ctx=spec["max_context"], n_threads=os.cpu_count(), n_batch=512,
                         verbose=False)
        self.info = {"n_threads": os.cpu_count()}

    def prefill(self, ids: list[int], new: int) -> None:
        self.llm.reset()
        self.llm.eval(ids)
        self.tok = self.llm.sample(temp=0.0)

    def decode(self, new: int) -> None:
        for _ in range(new):
            self.llm.eval([self.tok])
            self.tok = self.llm.sample(temp=0.0)

    def ppl(self, ids: list[int]) -> float:
        del self.llm  # one model in memory at a time
        llm = self.Llama(model_path=self.path, n_ctx=len(ids) + 16, n_threads=os.cpu_count(), n_batch=512,
                         logits_all=True, verbose=False)
        llm.eval(ids)
        scores = np.asarray(llm.scores[:len(ids)])
        return float(np.exp(np.mean([_nll(scores[i], ids[i + 1]) for i in range(len(ids) - 1)])))


KINDS = {"edge": EdgeSystem, "hf": HfSystem, "genai": GenaiSystem, "llamacpp": LlamaCppSystem}


def worker(spec: dict) -> None:
    """JSON lines on the original stdout; the libraries' own prints go to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(**kw) -> None:
        proto.write(json.dumps(kw) + "\n")

    try:
        system = KINDS[spec["kind"]](spec)
    except Exception as e:  # the parent names the system and stops
        reply(error=f"{type(e).__name__}: {e}")
        return
    reply(ready=True, info=system.info)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "prefill":
            system.prefill(cmd["ids"], cmd["new"])
            reply(ok=True)
        elif cmd["op"] == "decode":
            time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            system.decode(cmd["new"])
            reply(tok_s=cmd["new"] / (time.perf_counter() - t0))
        elif cmd["op"] == "ppl":
            try:
                reply(ppl=system.ppl(cmd["ids"]))
            except Exception as e:  # e.g. a genai build without get_logits: no figure, and why
                reply(ppl=None, why=f"{type(e).__name__}: {e}")
        else:
            return


class Worker:
    def __init__(self, name: str, spec: dict):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self.ask(None)["info"]

    def ask(self, cmd: dict | None) -> dict:
        if cmd is not None:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"decode_speed: the {self.name} worker exited (code {self.proc.wait()}); "
                             "its error is above")
        msg = json.loads(line)
        if "error" in msg:
            raise SystemExit(f"decode_speed: {self.name} failed to load: {msg['error']}")
        return msg

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


# ---- the parent: specs, alternating rounds, the report -----------------------------------------

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
              "amx_int8", "asimd", "asimddp", "sve", "i8mm")


def machine() -> dict:
    """The CPU the figures are from: model (and x86 family/model, which name the core
    generation when the model string is generic), the SIMD flags that pick kernels (ours,
    ORT's, llama.cpp's), cores, and which of our kernels this CPU gets by default."""
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
        if key in ("cpu family", "model") and key not in info:
            info[key] = val.strip()
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


def system_specs(a) -> tuple[dict[str, dict], dict[str, str]]:
    """name -> worker spec, and the edge-vila variants' labels."""
    max_ctx = max(max(a.contexts) + a.new + 8, 128)
    edge = {"kind": "edge", "bundle": str(a.bundle), "max_context": max_ctx, "kernel": a.kernel}
    specs = {"edge_vila_ort": edge}
    labels = {"edge_vila_ort": f"edge-vila {a.bundle.name}"}
    for flag, name, opts, label in ((a.compare_attention, "gqa", {"attention": "gqa"}, "GroupQueryAttention"),
                                    (a.compare_kv, "fp32_kv", {"kv_cache": "fp32"}, "fp32 KV"),
                                    (a.compare_matmul, "nbits", {"matmul": "nbits"}, "MatMulNBits"),
                                    (a.compare_head, "float_head", {"lm_head": "float"}, "float head")):
        if flag:
            specs[f"edge_vila_ort_{name}"] = {**edge, "opts": opts}
            labels[f"edge_vila_ort_{name}"] = f"edge-vila {label}"
    for item in a.extra_bundle:
        name, _, path = item.partition("=")
        if not path or not Path(path).is_dir():
            raise SystemExit(f"decode_speed: --extra-bundle {item!r}: expected NAME=BUNDLE_FOLDER")
        specs[f"edge_vila_ort_{name}"] = {**edge, "bundle": path}
        labels[f"edge_vila_ort_{name}"] = f"edge-vila {name}"
    if not a.no_hf:
        specs[HF] = {"kind": "hf", "hf": str(a.hf)}
    if a.genai:
        specs[GENAI] = {"kind": "genai", "path": str(a.genai)}
    if a.gguf:
        specs[LLAMA] = {"kind": "llamacpp", "path": str(a.gguf), "max_context": max_ctx + 16}
    return specs, labels


def alternate(workers: dict[str, Worker], prompts: dict[int, list[int]], new: int, runs: int,
              paired: dict | None) -> dict[str, dict[int, list[float]]]:
    """Rounds of (every context x every system), the order of systems rotated each round."""
    names = list(workers)
    rates = {n: {c: [] for c in prompts} for n in names}
    if paired is not None:
        from roofline import stream_copy_gbps  # same folder: the same estimator as roofline.py's bound
    for r in range(runs + 1):  # round 0 warms up
        order = names[r % len(names):] + names[:r % len(names)]
        for ctx, ids in prompts.items():
            for n in order:
                workers[n].ask({"op": "prefill", "ids": ids, "new": new})
                gbps = stream_copy_gbps(passes=5) if (paired is not None and r) else None
                tok_s = workers[n].ask({"op": "decode", "new": new})["tok_s"]
                if r:
                    rates[n][ctx].append(tok_s)
                    if gbps is not None:
                        paired.setdefault(n, {}).setdefault(str(ctx), []).append((tok_s, gbps))
        print(f"round {r}/{runs}{' (warm-up)' if r == 0 else ''} done", flush=True)
    return rates


def report(res: dict, rates: dict[str, dict[int, list[float]]], labels: dict[str, str]) -> None:
    edges = [n for n in rates if n.startswith("edge_vila")]
    peers = [n for n in rates if n in PEER_SHORT]
    res["runs_tok_s"] = {n: {str(c): [round(v, 2) for v in vs] for c, vs in per.items()} for n, per in rates.items()}
    for ctx in next(iter(rates.values())):
        row = {n: statistics.median(rates[n][ctx]) for n in rates}
        for e in edges:
            prefix = "" if e == "edge_vila_ort" else e.removeprefix("edge_vila_ort_") + "_"
            for p in peers:
                row[f"{prefix}ratio_vs_{PEER_SHORT[p]}"] = row[e] / row[p]
        res["results"][str(ctx)] = row
    r = res["results"]
    lo, hi = str(min(map(int, r))), str(max(map(int, r)))
    res["long_vs_short"] = {n: r[hi][n] / r[lo][n] for n in rates}
    res["edge_vila_long_vs_short"] = res["long_vs_short"]["edge_vila_ort"]
    if "edge_vila_ort_nbits" in rates:
        res["edge_vila_nbits_vs_edge"] = {c: r[c]["edge_vila_ort_nbits"] / r[c]["edge_vila_ort"] for c in r}

    ppl = res.get("perplexity", {})
    print(f"\nmedian of {res['runs']} alternating rounds, {res['new_tokens']} new tokens; tok/s (min-max)")
    print(f"{'system':34s}" + "".join(f"{'ctx ' + c:>22s}" for c in r) + f"{'at ' + hi + '/' + lo:>13s}  perplexity")
    for n in rates:
        cells = "".join(f"{r[c][n]:9.1f} ({min(rates[n][int(c)]):5.1f}-{max(rates[n][int(c)]):5.1f})" for c in r)
        p = ppl.get(n)
        print(f"{labels.get(n, n):34s}{cells}{res['long_vs_short'][n]:13.2f}  {p if p is not None else '-'}")
    for e in edges:
        for p in peers:
            print(f"{labels[e]} / {p}: " + " / ".join(f"x{r[c][e] / r[c][p]:.2f}" for c in r))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(json.loads(sys.argv[2]))
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True, type=Path, help="the HF model folder (its tokenizer makes the prompts)")
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
    ap.add_argument("--compare-head", action="store_true",
                    help="also run edge-vila with the bundle's float output head (the CPU graph's default: 8-bit)")
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
    for p, what in ((a.hf, "--hf"), (a.bundle, "--bundle"), (a.genai, "--genai"), (a.gguf, "--gguf")):
        if p is not None and not p.exists():
            raise SystemExit(f"decode_speed: {what} {p}: no such file or folder")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(a.hf))
    encode = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    res = {"machine": machine(), "forced_kernel": a.kernel, "new_tokens": a.new, "runs": a.runs,
           "pause_before_decode_s": PAUSE_S, "results": {}}
    print(f"machine: {res['machine']}", flush=True)
    specs, labels = system_specs(a)
    res["systems"] = specs
    workers: dict[str, Worker] = {}
    try:
        for name, spec in specs.items():
            print(f"loading {name} ...", flush=True)
            workers[name] = Worker(name, spec)
        res["chose"] = {n: w.info for n, w in workers.items()}
        main_info = res["chose"]["edge_vila_ort"]  # the keys roofline.py reads
        res.update(edge_vila_kv_cache=main_info["kv_cache"], edge_vila_attention=main_info["attention"],
                   edge_vila_matmul=main_info["matmul"])
        paired = res["paired_bandwidth"] = {} if a.paired_bandwidth else None
        prompts = {c: prompt_ids(encode, c) for c in a.contexts}
        rates = alternate(workers, prompts, a.new, a.runs, paired)
        res["order"] = "rounds of every context x every system, the systems' order rotated by one each round"
        if a.ppl_tokens:  # speed at equal quality: each system's perplexity on the same held-out tokens
            ids = heldout_ids(encode, a.ppl_tokens)
            res["perplexity"] = {"tokens": len(ids)}
            for n, w in workers.items():
                msg = w.ask({"op": "ppl", "ids": ids})
                res["perplexity"][n] = None if msg["ppl"] is None else round(msg["ppl"], 3)
                if msg.get("why"):
                    res["perplexity"][f"{n}_why_none"] = msg["why"]
    finally:
        for w in workers.values():
            w.close()
    report(res, rates, labels)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(a.out)
    _plot(res, rates, labels, a.out.with_suffix(".png"))
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")


def _plot(res: dict, rates: dict, labels: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for n, per in rates.items():
        ctx = sorted(per)
        med = [statistics.median(per[c]) for c in ctx]
        err = [[m - min(per[c]) for c, m in zip(ctx, med)], [max(per[c]) - m for c, m in zip(ctx, med)]]
        ax.errorbar(ctx, med, yerr=err, marker="o", capsize=3, label=labels.get(n, n))
    cpu = res["machine"].get("cpu") or res["machine"]["arch"]
    ax.set_title(f"decode, median of {res['runs']} alternating rounds (bars: min-max); {cpu}", fontsize=8)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
