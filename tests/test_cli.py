"""The CLI end to end: make-tiny -> info -> chat about a real photo; bad input -> one line, exit 2."""
from __future__ import annotations

import json
import subprocess
import sys


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_vila", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_info_and_chat_about_astronaut(tiny_ckpt, photo):
    r = cli("info", tiny_ckpt)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["projector"]["kind"] == "mlp_downsample" and info["tokens_per_image"] == 16
    r = cli("chat", tiny_ckpt, "--image", photo, "--prompt", "What is in this photo?", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "TTFT" in r.stderr and "tok/s" in r.stderr


def test_interactive_chat_two_turns(tiny_ckpt, photo):
    r = cli("chat", tiny_ckpt, "--max-new-tokens", "4", stdin=f"/image {photo}\nhello\nand again\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("TTFT") == 2
    # the second turn reused the first (prefill counts are printed per turn)
    assert "reused 0)" in r.stderr.split("TTFT")[1] and "reused 0)" not in r.stderr.split("TTFT")[2]


def test_bad_inputs_print_one_line_and_exit_2(tiny_ckpt, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x00\x01garbage")
    for args, needle in [(("info", tmp_path / "missing"), "no such checkpoint folder"),
                         (("chat", tiny_ckpt, "--image", bad, "--prompt", "hi"), "x.png: not an image"),
                         (("chat", tiny_ckpt, "--max-context", "16", "--prompt", "hi " * 50), "context holds 16")]:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = [line for line in r.stderr.splitlines() if line.strip() and "Loading weights" not in line]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


def test_cli_defaults_are_the_python_api_defaults():
    """Each verb's flags restate its options dataclass's defaults (argparse shows them in --help); a
    default changed on one side only would make `edge-vila quantize` and `quantize_checkpoint()`
    quietly disagree."""
    from edge_vila.cli import build_parser, export_options, quantize_options, sampling_params
    from edge_vila.export.bundle import ExportOptions
    from edge_vila.generate import SamplingParams
    from edge_vila.quant.quantize import QuantizeOptions

    p = build_parser()
    assert quantize_options(p.parse_args(["quantize", "m", "--out", "o"])) == QuantizeOptions()
    assert export_options(p.parse_args(["export", "m", "--out", "o"])) == ExportOptions()
    for argv in (["chat", "m"], ["run", "m", "--prompt", "hi"]):
        assert sampling_params(p.parse_args(argv)) == SamplingParams(), argv
