"""Packaging contracts: the runtime imports without torch; subpackages map as the card asks."""
from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          cwd="/").stdout.strip()


def test_import_edge_vila_pulls_no_torch_or_transformers():
    out = _run("import sys, edge_vila, edge_vila.config, edge_vila.prompt, edge_vila.generate, edge_vila.preprocess,"
               " edge_vila.kvcache, edge_vila.jetson; print(sorted(m for m in sys.modules if m.split('.')[0] in "
               "('torch', 'transformers')))")
    assert out == "[]"


def test_toolchain_subpackages_install_under_edge_vila():
    out = _run("import edge_vila.quant, edge_vila.export, edge_vila.jetson, pathlib;"
               "print(*(pathlib.Path(m.__file__).parent.name for m in (edge_vila.quant, edge_vila.export, edge_vila.jetson)))")
    assert out == "quant export jetson"


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "edge_vila", "--help"], capture_output=True, text=True, check=True)
    for verb in ("info", "chat", "make-tiny", "convert-gguf"):
        assert verb in out.stdout
