"""The toolchain at real model sizes: wall time and peak memory of each step on a full-size
replica of a released checkpoint (released config, bf16 shards, random weights).

    python benchmarks/scale.py [--model VILA1.5-3b] [--work runs/scale] [--keep] [--llm-layers N]
        [--max-context 2048] [--decode [--decode-args ...]] [--ttft] [--awq | --awq-only] [--quantize-args ...]

Steps, each its own process (its peak RSS is the kernel's figure for that process, from
wait4): make the replica -> `edge-vila quantize --method rtn` -> `edge-vila export` (whose
report.json checks the bundle against the torch reference of the quantized checkpoint, in
exact mode). With --decode, then: hf_to_gguf.py writes a Q4_0 GGUF of the replica's llm/
with a Q8_0 head (our CPU graph's default head format; streamed, its sentencepiece vocabulary),
onnxruntime-genai's builder its int4 build, and decode_speed.py times the bundle (8-bit and
float head), llama.cpp and genai side by side (5 alternating rounds, median). With
--ttft, a second bundle with the float32 ViT (`--vision-quant fp32`, no report) and
`edge-vila bench` on both: time to first token for one image + 32 text tokens and the
vision encode alone, INT8 vs fp32 ViT, median of 3, in the same run. With --awq, then
`edge-vila quantize --method awq` of the replica with every default (its own step: wall time,
peak RSS, and the report's search time and perplexities; not exported); --awq-only makes the
replica (or, with --keep, reuses it) and runs that step alone, for the hours-long CPU figure. Writes
<work>/scale.json and prints a table. Not a test: timings depend on the machine, which is
recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_step(name: str, cmd: list[str], log_dir: Path) -> dict:
    """Run `cmd`, return its wall time and the peak RSS of that process tree's largest process."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"{name}.log", "w")
    print(f"[scale] {name}: {' '.join(map(str, cmd))}", flush=True)
    t0 = time.perf_counter()
    p = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    log.close()
    res = {"step": name, "seconds": round(wall, 1), "peak_rss_gb": round(ru.ru_maxrss / 1024 ** 2, 2),
           "returncode": p.returncode, "log": str(log_dir / f"{name}.log")}
    print(f"[scale] {name}: {res['seconds']} s, peak RSS {res['peak_rss_gb']} GB, exit {p.returncode}", flush=True)
    if p.returncode:
        tail = (log_dir / f"{name}.log").read_text()[-3000:]
        print(tail, file=sys.stderr)
    return res


def _awq_step(py: str, work: Path, replica: Path, args: list[str], steps: list) -> dict:
    """AWQ of the replica as a user runs it; the step's time and memory, the report's figures."""
    out = work / "quantized-awq"
    step = run_step("quantize_awq", [py, "-m", "edge_vila", "quantize", replica, "--out", out, "--method", "awq",
                                     *args], work / "logs")
    steps.append(step)
    from edge_vila.quant.gate import rejected_path

    rep = out / "quant_report.json"
    if not rep.is_file():  # the quality gate writes the report beside the folder it refused
        rep = rejected_path(out)
    r = json.loads(rep.read_text()) if rep.is_file() else {}
    return {"seconds": step["seconds"], "peak_rss_gb": step["peak_rss_gb"], "search_seconds": r.get("search_seconds"),
            "calibration": r.get("calibration"), "perplexity": r.get("perplexity"),
            "written": (out / "quant_report.json").is_file()}


def _decode_steps(py: str, work: Path, replica: Path, bundle: Path, args: list[str], steps: list) -> dict | None:
    """The peers' builds of the replica's LLM (kept in `work` for the next run), then
    decode_speed.py with all three in one run; its JSON is folded into scale.json."""
    # Q4_0 weights with a Q8_0 head: the head format our CPU graph reads by default (8 bits per 32)
    gguf, genai, res = work / "llm-q4_0-q8head.gguf", work / "genai-int4", work / "decode_speed.json"
    if not gguf.is_file():
        steps.append(run_step("gguf_q4_0", [py, HERE / "hf_to_gguf.py", replica / "llm", gguf, "--type", "q4_0",
                                            "--head-q8"], work / "logs"))
    if not (genai / "genai_config.json").is_file():
        steps.append(run_step("genai_int4_build", [py, "-m", "onnxruntime_genai.models.builder", "-i", replica / "llm",
                                                   "-o", genai, "-p", "int4", "-e", "cpu"], work / "logs"))
    steps.append(run_step("decode", [py, HERE / "decode_speed.py", "--hf", replica / "llm", "--bundle", bundle,
                                     "--gguf", gguf, "--genai", genai, "--no-hf", "--out", res, *args], work / "logs"))
    return json.loads(res.read_text()) if res.is_file() else None


def _ttft_steps(py: str, work: Path, quant: Path, bundle: Path, max_context: int, steps: list) -> dict:
    """TTFT and vision latency of the INT8-ViT bundle and of a float32-ViT export of the same
    checkpoint, each through `edge-vila bench` (the fast CPU graph is built by the first load,
    outside the timings)."""
    fp32 = work / "bundle-vision-fp32"
    steps.append(run_step("export_vision_fp32", [py, "-m", "edge_vila", "export", quant, "--out", fp32,
                                                 "--vision-quant", "fp32", "--no-report",
                                                 "--max-context", max_context], work / "logs"))
    out = {}
    for name, b in (("vision_int8", bundle), ("vision_fp32", fp32)):
        res = work / f"bench-{name}"
        steps.append(run_step(f"bench_{name}", [py, "-m", "edge_vila", "bench", b, "--contexts", "64",
                                                "--decode-tokens", "8", "--text-tokens", "32", "--repeats", "3",
                                                "--no-power", "--out", res], work / "logs"))
        if (res / "bench.json").is_file():
            r = json.loads((res / "bench.json").read_text())
            out[name] = {k: r.get(k) for k in ("ttft_s", "vision_s", "prefill_tok_s")}
    if len(out) == 2:
        out["ttft_fp32_over_int8"] = round(out["vision_fp32"]["ttft_s"] / out["vision_int8"]["ttft_s"], 3)
        out["vision_fp32_over_int8"] = round(out["vision_fp32"]["vision_s"] / out["vision_int8"]["vision_s"], 3)
    return out


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:  # the model name says far more than "x86_64"
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith(("model name", "Model")))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(),
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3, 1)}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE).stdout.strip() or None
    except OSError:
        return None


def _awq_only(a, py: str, work: Path, replica: Path, steps: list) -> int:
    """The replica and its AWQ, nothing else; its own JSON so a full run's scale.json stays."""
    out = {"model": a.model, "date": time.strftime("%Y-%m-%d"), "machine": _machine(), "commit": _commit(),
           "steps": steps}
    if all(s["returncode"] == 0 for s in steps):
        out["awq"] = _awq_step(py, work, replica, a.quantize_args, steps)
    (work / "scale-awq.json").write_text(json.dumps(out, indent=2))
    for s in steps:
        print(f"  {s['step']:<16} {s['seconds']:>8.1f} s  {s['peak_rss_gb']:>6.2f} GB  exit {s['returncode']}")
    w = out.get("awq")
    if w:
        print(f"  quantize(awq): {w['seconds']} s (search {w['search_seconds']} s), peak RSS {w['peak_rss_gb']} GB, "
              f"perplexity {(w['perplexity'] or {}).get('awq')}{'' if w['written'] else ' (not written)'}")
    print(f"wrote {work / 'scale-awq.json'}")
    return 0 if all(s["returncode"] == 0 for s in steps) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="VILA1.5-3b", help="a released layout edge_vila.released knows")
    ap.add_argument("--work", type=Path, default=Path("runs/scale"))
    ap.add_argument("--llm-layers", type=int, default=None, help="fewer decoder layers (default: the release's)")
    ap.add_argument("--keep", action="store_true",
                    help="reuse the replica (and a quantized checkpoint with its recorded figures) already in --work")
    ap.add_argument("--quantize-args", nargs=argparse.REMAINDER, default=[])
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--decode", action="store_true",
                    help="then decode tokens/s of the bundle beside llama.cpp (a Q4_0 GGUF of the replica's LLM, Q8_0 head) and "
                         "onnxruntime-genai's int4 build of it, via decode_speed.py (needs llama-cpp-python and "
                         "onnxruntime-genai)")
    ap.add_argument("--decode-args", nargs="*", default=["--contexts", "64", "512", "1024", "--new", "32", "--runs", "5",
                                                         "--ppl-tokens", "128", "--compare-head"])
    ap.add_argument("--awq", action="store_true",
                    help="then `quantize --method awq` of the replica with the default calibration (hours on a "
                         "CPU at 3B: about 2 h on 2 cores)")
    ap.add_argument("--awq-only", action="store_true",
                    help="the replica and the AWQ step only (no RTN, export, decode or TTFT steps)")
    ap.add_argument("--ttft", action="store_true",
                    help="then TTFT (1 image + 32 text tokens) with the INT8 ViT vs a float32-ViT export, via "
                         "edge-vila bench")
    a = ap.parse_args()

    py = sys.executable
    work = a.work / a.model
    replica, quant, bundle = work / "replica", work / "quantized", work / "bundle"
    steps = []
    if not (a.keep and replica.is_dir()):
        layers = f", llm_layers={a.llm_layers}" if a.llm_layers else ", llm_layers=None, vision_layers=None"
        steps.append(run_step("replica", [py, "-c", "from edge_vila.replicas import make_replica; "
                                          f"make_replica({str(replica)!r}, {a.model!r}{layers})"], work / "logs"))
    if a.awq_only:
        return _awq_only(a, py, work, replica, steps)
    prev = json.loads((work / "scale.json").read_text()) if (work / "scale.json").is_file() else {}
    prev_q = [s for s in prev.get("steps", []) if s["step"] == "quantize_rtn" and s["returncode"] == 0]
    if a.keep and (quant / "quant_report.json").is_file() and prev_q:
        print("[scale] quantize_rtn: reusing the quantized checkpoint and its figures from the last run", flush=True)
        steps.append({**prev_q[0], "reused": True})
    else:
        steps.append(run_step("quantize_rtn", [py, "-m", "edge_vila", "quantize", replica, "--out", quant,
                                               "--method", "rtn", *a.quantize_args], work / "logs"))
    steps.append(run_step("export", [py, "-m", "edge_vila", "export", quant, "--out", bundle,
                                     "--max-context", a.max_context], work / "logs"))
    decode = ttft = None
    if a.decode and (bundle / "manifest.json").is_file():
        decode = _decode_steps(py, work, replica, bundle, a.decode_args, steps)
    if a.ttft and (bundle / "manifest.json").is_file():
        ttft = _ttft_steps(py, work, quant, bundle, a.max_context, steps)
    out = {"model": a.model, "date": time.strftime("%Y-%m-%d"), "machine": _machine(), "commit": _commit(),
           "steps": steps}
    if (bundle / "manifest.json").is_file():
        out["bundle_gb"] = round(sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) / 1024 ** 3, 2)
        rep = bundle / "report.json"
        if rep.is_file():
            out["vs_torch_reference"] = json.loads(rep.read_text()).get("vs_torch_reference")
    qrep = quant / "quant_report.json"
    if qrep.is_file():
        r = json.loads(qrep.read_text())
        out["quality"] = {"perplexity": r.get("perplexity"), "vision_int8": (r.get("vision_int8") or {}).get("chosen")}
    tool = [s for s in steps if s["step"] in ("quantize_rtn", "export")]
    out["quantize_plus_export"] = {"seconds": round(sum(s["seconds"] for s in tool), 1),
                                   "peak_rss_gb": max(s["peak_rss_gb"] for s in tool)}
    if decode is not None:
        out["decode"] = decode
    if ttft is not None:
        out["ttft"] = ttft
    if a.awq:
        out["awq"] = _awq_step(py, work, replica, a.quantize_args, steps)
    (work / "scale.json").write_text(json.dumps(out, indent=2))
    print(f"\n{a.model}: quantize(rtn)+export {out['quantize_plus_export']['seconds']} s, "
          f"peak RSS {out['quantize_plus_export']['peak_rss_gb']} GB; bundle {out.get('bundle_gb')} GB")
    for s in steps:
        print(f"  {s['step']:<16} {s['seconds']:>8.1f} s  {s['peak_rss_gb']:>6.2f} GB  exit {s['returncode']}")
    for ctx, row in ((decode or {}).get("results") or {}).items():
        print(f"  decode at {ctx:>5}: edge-vila {row['edge_vila_ort']:.1f} tok/s, x{row.get('ratio_vs_llama_cpp', 0):.2f} "
              f"llama.cpp Q4_0, x{row.get('ratio_vs_genai', 0):.2f} onnxruntime-genai int4")
    if out.get("awq"):
        w = out["awq"]
        print(f"  quantize(awq): {w['seconds']} s (search {w['search_seconds']} s), peak RSS {w['peak_rss_gb']} GB, "
              f"perplexity {(w['perplexity'] or {}).get('awq')}{'' if w['written'] else ' (not written)'}")
    for name in ("vision_int8", "vision_fp32"):
        row = (ttft or {}).get(name)
        if row:
            print(f"  TTFT ({name}): {row['ttft_s']:.2f} s, vision {row['vision_s']:.2f} s")
    print(f"wrote {work / 'scale.json'}")
    return 0 if all(s["returncode"] == 0 for s in steps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
