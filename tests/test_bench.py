"""`edge-vila bench` on a tiny bundle: every figure is produced, JSON + PNG written."""
from __future__ import annotations

import json
import subprocess
import sys


def test_bench_cli_writes_json_and_png(tiny_bundle, tmp_path):
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "edge_vila", "bench", str(tiny_bundle), "--contexts", "16,64",
                        "--decode-tokens", "4", "--repeats", "1", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "bench.json").read_text())
    assert res["backend"] == "onnxruntime" and res["ttft_s"] > 0 and res["vision_s"] > 0
    assert set(res["decode_tok_s"]) == {"16", "64"} and all(v > 0 for v in res["decode_tok_s"].values())
    assert res["prefill_tok_s"] > 0 and res["peak_rss_mb"] > 50 and res["power_w"] is None  # no Jetson here
    assert (out / "bench.png").stat().st_size > 1000
    assert "decode @ 64" in r.stdout and "TTFT" in r.stdout
