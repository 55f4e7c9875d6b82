"""Server figures (issue #7): 200 sequential and 20 concurrent requests on loopback, all
answered or cleanly rejected (no 5xx, no hang).

    python benchmarks/server_load.py BUNDLE [--port 8765] [--out runs/bench/server]

Starts `edge-vila serve` as a subprocess (loopback only), sends text and image requests,
half of them streamed, and records status codes and latencies.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from edge_vila.synthetic.world import random_scene, rng_for


def _image_url(k: int) -> str:
    buf = io.BytesIO()
    random_scene(rng_for(3, k)).render(64).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _request(url: str, k: int) -> tuple[int, float]:
    content = [{"type": "text", "text": "How many shapes are there?"}]
    if k % 2 == 0:
        content.append({"type": "image_url", "image_url": {"url": _image_url(k)}})
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 16, "stream": k % 4 < 2}
    t0 = time.perf_counter()
    try:
        if body["stream"]:
            with httpx.stream("POST", url, json=body, timeout=120) as r:
                lines = [l for l in r.iter_lines() if l.startswith("data: ")]
                if r.status_code == 200 and lines[-1] != "data: [DONE]":
                    return -1, time.perf_counter() - t0  # truncated stream
                return r.status_code, time.perf_counter() - t0
        r = httpx.post(url, json=body, timeout=120)
        return r.status_code, time.perf_counter() - t0
    except httpx.TimeoutException:
        return -2, time.perf_counter() - t0  # a hang


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--sequential", type=int, default=200)
    ap.add_argument("--concurrent", type=int, default=20)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--out", default="runs/bench/server")
    a = ap.parse_args()
    proc = subprocess.Popen([sys.executable, "-m", "edge_vila", "serve", a.bundle, "--port", str(a.port),
                             "--max-queue", str(a.max_queue)])
    base = f"http://127.0.0.1:{a.port}"
    try:
        from edge_vila.testing import wait_healthy

        if not wait_healthy(base, proc):
            raise SystemExit("edge-vila serve did not come up")
        url = base + "/v1/chat/completions"
        seq = [_request(url, k) for k in range(a.sequential)]
        with cf.ThreadPoolExecutor(a.concurrent) as ex:
            conc = list(ex.map(lambda k: _request(url, k), range(a.concurrent)))
        metrics = httpx.get(base + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    def summary(rows):
        codes: dict[int, int] = {}
        for c, _ in rows:
            codes[c] = codes.get(c, 0) + 1
        ok = [t for c, t in rows if c == 200]
        return {"codes": codes, "latency_ms_median": 1000 * statistics.median(ok) if ok else None,
                "clean": all(c in (200, 429, 503) for c, _ in rows)}

    res = {"sequential": summary(seq), "concurrent": summary(conc), "max_queue": a.max_queue}
    print(json.dumps({k: v for k, v in res.items()}, indent=2))
    print("metrics:", " ".join(l for l in metrics.splitlines() if l.startswith("edge_vila_requests_total")))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "server.json").write_text(json.dumps(res, indent=2))
    sys.exit(0 if res["sequential"]["clean"] and res["concurrent"]["clean"] else 1)


if __name__ == "__main__":
    main()
