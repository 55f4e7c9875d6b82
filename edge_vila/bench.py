"""`edge-vila bench BUNDLE`: the numbers a user asks of a bundle on their machine.

TTFT (1 image + N text tokens: vision encode + prefill, to the first logits), prefill
tokens/s, decode tokens/s at several context lengths, vision latency, peak RSS; on a
Jetson also mean power (W) and energy per decoded token (J) from jtop/tegrastats.
Each figure is the median of `repeats` runs after one warm-up. Works on any backend,
because it drives the backend interface directly (no tokenizer or sampling in the loop).
"""
from __future__ import annotations

import logging
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class BenchOptions:
    contexts: tuple[int, ...] = (64, 512, 1024)
    decode_tokens: int = 32
    text_tokens: int = 32
    prefill_tokens: int = 256
    repeats: int = 5
    power: bool = True


@dataclass
class BenchResult:
    backend: str
    machine: dict
    ttft_s: float | None = None
    vision_s: float | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: dict[int, float] = field(default_factory=dict)
    decode_ratio_max_vs_min_ctx: float | None = None
    peak_rss_mb: float = 0.0
    power_w: float | None = None
    joules_per_token: float | None = None
    options: dict = field(default_factory=dict)


def machine() -> dict:
    import os

    from .jetson.detect import detect

    info = detect()
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "jetson": info.to_dict() if info.is_jetson else None}


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _ids(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(10, max(11, vocab - 1), size=n)


def run_bench(pipe, o: BenchOptions | None = None) -> BenchResult:
    o = o or BenchOptions()
    be = pipe.backend
    vocab = pipe.cfg.llm.vocab_size
    res = BenchResult(backend=be.name, machine=machine(), options=asdict(o))
    reset = getattr(be, "reset", lambda: None)
    if pipe.cfg.is_multimodal:
        pre = pipe.cfg.preprocess
        pixels = np.random.default_rng(0).standard_normal((1, 3, pre.height, pre.width)).astype(np.float32)
        # a dynamic_s2 bundle's image alone in its message: the ViT, then the projector (untiled)
        encode = getattr(be, "encode_untiled", be.encode_images)
        res.vision_s = _median_time(lambda: encode(pixels), o.repeats)
        text = be.embed(_ids(vocab, o.text_tokens))

        def ttft():
            reset()
            img = encode(pixels)[0]
            be.forward(np.concatenate([img, text]), 0)
        res.ttft_s = _median_time(ttft, o.repeats)
    else:
        text = be.embed(_ids(vocab, o.text_tokens))

        def ttft():
            reset()
            be.forward(text, 0)
        res.ttft_s = _median_time(ttft, o.repeats)
    n_pre = min(o.prefill_tokens, be.max_context - 1)
    pre_emb = be.embed(_ids(vocab, n_pre, 1))

    def prefill():
        reset()
        be.forward(pre_emb, 0)
    res.prefill_tok_s = n_pre / _median_time(prefill, o.repeats)
    stats = None
    if o.power:
        from .jetson.stats import open_stats

        stats = open_stats()
    energy: list[tuple[float, int]] = []
    for ctx in o.contexts:
        if ctx + o.decode_tokens > be.max_context:
            log.warning("skipping context %d: beyond the backend's max context %d", ctx, be.max_context)
            continue
        prompt = be.embed(_ids(vocab, ctx, 2))
        one = be.embed(_ids(vocab, 1, 3))
        rates = []
        for r in range(o.repeats + 1):
            reset()
            be.forward(prompt, 0)
            meter = None
            if stats is not None and r > 0:
                from .jetson.stats import PowerMeter

                meter = PowerMeter(stats).__enter__()
            t0 = time.perf_counter()
            for i in range(o.decode_tokens):
                be.forward(one, ctx + i)  # the token's identity does not change the cost
            dt = time.perf_counter() - t0
            if meter is not None:
                meter.__exit__(None, None, None)
                if meter.energy_j() is not None:
                    energy.append((meter.energy_j(), o.decode_tokens))
                    res.power_w = meter.mean_w()
            if r > 0:
                rates.append(o.decode_tokens / dt)
        res.decode_tok_s[ctx] = statistics.median(rates)
    if stats is not None:
        stats.close()
    if energy:
        res.joules_per_token = sum(e for e, _ in energy) / sum(n for _, n in energy)
    if len(res.decode_tok_s) >= 2:
        ks = sorted(res.decode_tok_s)
        res.decode_ratio_max_vs_min_ctx = res.decode_tok_s[ks[-1]] / res.decode_tok_s[ks[0]]
    res.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def write_report(res: BenchResult, out: Path) -> list[Path]:
    from .fsutil import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench.json", asdict(res))
    written = [out / "bench.json"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no chart (pip install matplotlib)")
        return written
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    ks = sorted(res.decode_tok_s)
    axes[0].bar([str(k) for k in ks], [res.decode_tok_s[k] for k in ks], color="#76b900")
    axes[0].set(title=f"decode ({res.backend})", xlabel="context (tokens)", ylabel="tokens/s")
    lat = {"vision": res.vision_s, "TTFT": res.ttft_s}
    lat = {k: v * 1000 for k, v in lat.items() if v is not None}
    axes[1].bar(list(lat), list(lat.values()), color="#555")
    axes[1].set(title="latency", ylabel="ms")
    fig.suptitle(f"{res.machine['processor']} · peak RSS {res.peak_rss_mb:.0f} MB"
                 + (f" · {res.power_w:.1f} W" if res.power_w else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=110)
    plt.close(fig)
    written.append(out / "bench.png")
    return written


def summary(res: BenchResult) -> str:
    rows = [f"backend          {res.backend}"]
    if res.vision_s is not None:
        rows.append(f"vision           {res.vision_s * 1000:.1f} ms / image")
    rows.append(f"TTFT             {res.ttft_s * 1000:.1f} ms ({'1 image + ' if res.vision_s is not None else ''}"
                f"{res.options['text_tokens']} text tokens)")
    rows.append(f"prefill          {res.prefill_tok_s:.0f} tokens/s")
    for k, v in sorted(res.decode_tok_s.items()):
        rows.append(f"decode @ {k:<7} {v:.1f} tokens/s")
    if res.decode_ratio_max_vs_min_ctx:
        rows.append(f"decode ratio     {res.decode_ratio_max_vs_min_ctx:.2f} (longest / shortest context)")
    rows.append(f"peak RSS         {res.peak_rss_mb:.0f} MB")
    if res.power_w:
        rows.append(f"power            {res.power_w:.1f} W, {res.joules_per_token:.3f} J/token")
    return "\n".join(rows)


__all__ = ["BenchOptions", "BenchResult", "run_bench", "write_report", "summary"]
