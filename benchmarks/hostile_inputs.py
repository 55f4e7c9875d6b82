"""Hostile inputs through `edge-vila run`, `edge-vila chat` and the server; counts what came back.

    python benchmarks/hostile_inputs.py [--bundle BUNDLE] [--out runs/hostile/hostile.json]

The corpus: a decompression bomb (a valid PNG header claiming 60000 x 60000), truncated,
empty, random and mislabelled files, a folder named like an image, a missing path, CMYK,
16-bit, palette + alpha, grayscale, 1 x 1, 1 x 4000 and 4000 x 1, animated GIF, WebP, an
EXIF-rotated JPEG, a prompt longer than the context; for the server also malformed bodies
(not JSON, wrong types, bad base64, unknown URL schemes, oversized fields). Each outcome is
one of: a valid answer (exit 0 / 2xx), a clean error (exit 2 with one `error:` line / 4xx with
an OpenAI-style error body), a traceback (in the CLI's stderr or the server's log) or a 5xx.
The run passes when there are no tracebacks and no 5xx. Without --bundle a tiny random-weight
bundle is exported first (about a minute).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from edge_vila.testing import bomb_png

EV = [sys.executable, "-m", "edge_vila"]


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def corpus(folder: Path) -> dict[str, Path]:
    """name -> path of each hostile or unusual image file."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    jpeg = _save(rgb, "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    frames = [Image.fromarray(np.full((32, 32, 3), c, np.uint8)) for c in (0, 128, 255)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    files: dict[str, bytes | None] = {
        "bomb.png": bomb_png(),
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "empty.png": b"",
        "random.png": rng.integers(0, 255, 4096, dtype=np.uint8).tobytes(),
        "text.jpg": b"this is not an image\n" * 20,
        "cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG"),
        "16bit.png": _save(Image.fromarray((rng.random((40, 40)) * 65535).astype(np.uint16)), "PNG"),
        "palette_alpha.png": _save(rgb.convert("RGBA").convert("P"), "PNG", transparency=0),
        "gray.png": _save(rgb.convert("L"), "PNG"),
        "rgba.png": _save(rgb.convert("RGBA"), "PNG"),
        "1x1.png": _save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "1x4000.png": _save(Image.new("RGB", (1, 4000), (10, 200, 10)), "PNG"),
        "4000x1.png": _save(Image.new("RGB", (4000, 1), (10, 10, 200)), "PNG"),
        "animated.gif": gif.getvalue(),
        "photo.webp": _save(rgb, "WEBP"),
        "exif_rotated.jpg": _save(rgb, "JPEG", exif=exif),
        "missing.png": None,
    }
    out = {}
    for name, data in files.items():
        p = folder / name
        if data is not None:
            p.write_bytes(data)
        out[name] = p
    (folder / "folder.png").mkdir(exist_ok=True)
    out["folder.png"] = folder / "folder.png"
    return out


def classify_cli(rc: int, err: str) -> str:
    if "Traceback" in err:
        return "traceback"
    if rc == 0:
        return "answer"
    if rc == 2 and sum(ln.startswith("error:") for ln in err.splitlines()) == 1:
        return "clean_error"
    return "other"


def run_cli(bundle: Path, files: dict[str, Path], long_prompt: str) -> list[dict]:
    rows = []
    cases = [(n, ["--image", str(p)], "Describe the image.") for n, p in files.items()]
    cases.append(("prompt_beyond_context", [], long_prompt))
    for name, extra, prompt in cases:
        r = subprocess.run([*EV, "-q", "run", str(bundle), *extra, "--prompt", prompt, "--max-new-tokens", "2"],
                           capture_output=True, text=True, timeout=300)
        rows.append({"verb": "run", "input": name, "outcome": classify_cli(r.returncode, r.stderr),
                     "exit": r.returncode, "stderr_tail": r.stderr.strip().splitlines()[-1:] if r.stderr else []})
    # chat: every image as an attachment to one turn, in one process (errors must not end the session)
    script = "".join(f"/image {p}\nWhat is this?\n" for p in files.values()) + long_prompt + "\n/quit\n"
    r = subprocess.run([*EV, "-q", "chat", str(bundle), "--max-new-tokens", "2"], input=script, capture_output=True,
                       text=True, timeout=600)
    errors = sum(ln.startswith("error:") for ln in r.stderr.splitlines())
    turns = len(files) + 1
    outcome = "traceback" if "Traceback" in r.stderr else ("session_ok" if r.returncode == 0 else "other")
    rows.append({"verb": "chat", "input": f"{turns} turns", "outcome": outcome, "exit": r.returncode,
                 "clean_errors": errors, "answers": turns - errors})
    return rows


def _data_url(p: Path) -> str:
    data = p.read_bytes() if p.is_file() else b""
    return "data:image/png;base64," + base64.b64encode(data).decode()


def server_bodies(files: dict[str, Path], long_prompt: str) -> list[tuple[str, bytes]]:
    def chat(content, **kw) -> bytes:
        return json.dumps({"model": "x", "messages": [{"role": "user", "content": content}], "max_tokens": 2,
                           **kw}).encode()

    out = [(f"image:{n}", chat([{"type": "text", "text": "What is this?"},
                                {"type": "image_url", "image_url": {"url": _data_url(p)}}]))
           for n, p in files.items() if p.is_file() or not p.exists()]
    out += [
        ("not_json", b"{not json"), ("not_utf8", b"\x80{}"), ("json_array", b"[1, 2]"), ("empty_body", b""), ("null", b"null"),
        ("no_messages", json.dumps({"model": "x"}).encode()),
        ("messages_not_list", json.dumps({"messages": "hi"}).encode()),
        ("message_not_object", json.dumps({"messages": [42]}).encode()),
        ("bad_role", json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode()),
        ("content_number", chat(12345)),
        ("bad_base64", chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}])),
        ("file_url", chat([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}])),
        ("http_url", chat([{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}])),
        ("unknown_part", chat([{"type": "audio", "audio": "x"}])),
        ("max_tokens_negative", chat("hi", max_tokens=-5)),
        ("max_tokens_string", chat("hi", max_tokens="many")),
        ("temperature_huge", chat("hi", temperature=1e308)),
        ("temperature_nan", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
        ("model_number", json.dumps({"model": 7, "messages": [{"role": "user", "content": "hi"}]}).encode()),
        ("prompt_beyond_context", chat(long_prompt)),
        ("deeply_nested", b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("unicode_garbage", chat("\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace") * 50)),
        ("too_many_images", chat([{"type": "image_url", "image_url": {"url": _data_url(files["1x1.png"])}}] * 50)),
    ]
    return out


def run_server(bundle: Path, files: dict[str, Path], long_prompt: str, log_path: Path) -> list[dict]:
    import httpx

    from edge_vila.testing import free_port, wait_healthy

    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([*EV, "serve", str(bundle), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(url, proc):
            raise SystemExit(f"server did not come up: {log_path.read_text()[-2000:]}")
        before = _counted(httpx.get(url + "/metrics", timeout=10).text)  # the health polls so far
        rows = []
        for name, body in server_bodies(files, long_prompt):
            r = httpx.post(url + "/v1/chat/completions", content=body, timeout=120,
                           headers={"Content-Type": "application/json"})
            try:
                err_body = "error" in r.json() if r.status_code >= 400 else False
            except ValueError:
                err_body = False
            outcome = ("5xx" if r.status_code >= 500 else "answer" if r.status_code < 300 else
                       "clean_error" if err_body else "other")
            rows.append({"verb": "serve", "input": name, "outcome": outcome, "status": r.status_code})
        metrics = httpx.get(url + "/metrics", timeout=10).text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    sent = len(rows)
    if "Traceback" in log_path.read_text():
        rows.append({"verb": "serve", "input": "server log", "outcome": "traceback"})
    # every status the server sent is in /metrics: the corpus's, and the first /metrics read's own 200
    counted = _counted(metrics) - before - 1
    rows.append({"verb": "serve", "input": "/metrics", "outcome": "answer" if counted == sent else "other",
                 "requests_counted": counted, "requests_sent": sent})
    return rows


def _counted(metrics: str) -> int:
    return sum(int(float(ln.rsplit(" ", 1)[1])) for ln in metrics.splitlines()
               if ln.startswith("edge_vila_requests_total"))


def tiny_bundle(root: Path) -> Path:
    from edge_vila.export.bundle import ExportOptions, export_bundle
    from edge_vila.testing import make_tiny_checkpoint

    src = make_tiny_checkpoint(root / "float", llm_hidden=128, intermediate=256, image_size=32)
    return export_bundle(src, root / "bundle", ExportOptions(group_size=32, max_context=512, report=False))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="bundle to attack (default: a tiny one, made here)")
    ap.add_argument("--out", type=Path, default=Path("runs/hostile/hostile.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = a.bundle or tiny_bundle(tmp / "tiny")
        (tmp / "corpus").mkdir()
        files = corpus(tmp / "corpus")
        ctx = json.loads((bundle / "manifest.json").read_text())["model"]["max_context"]
        long_prompt = "many words " * (ctx * 2)
        rows = run_cli(bundle, files, long_prompt)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        rows += run_server(bundle, files, long_prompt, a.out.with_suffix(".server.log"))
    counts = Counter(r["outcome"] for r in rows)
    by_verb = {v: dict(Counter(r["outcome"] for r in rows if r["verb"] == v)) for v in ("run", "chat", "serve")}
    res = {"inputs_tried": len(rows), "counts": dict(counts), "by_verb": by_verb, "rows": rows,
           "date": time.strftime("%Y-%m-%d")}
    a.out.write_text(json.dumps(res, indent=2))
    for r in rows:
        print(f"  {r['verb']:<6} {r['input']:<24} {r['outcome']:<12} {r.get('status', r.get('exit', ''))}")
    print(f"inputs tried {len(rows)}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    bad = counts.get("traceback", 0) + counts.get("5xx", 0) + counts.get("other", 0)
    print(f"wrote {a.out}; {'PASS' if not bad else 'FAIL'}: {counts.get('traceback', 0)} tracebacks, "
          f"{counts.get('5xx', 0)} 5xx, {counts.get('other', 0)} other")
    return 0 if not bad else 1


if __name__ == "__main__":
    raise SystemExit(main())
