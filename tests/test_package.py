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


def test_the_wheel_holds_every_package_and_the_op_sources(tmp_path):
    """A real (non-editable) build: every folder with an __init__.py under edge_vila/ and the
    top-level quant/, export/, jetson/ (as edge_vila.*) is in the wheel, with our C sources."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(root)], check=True, capture_output=True, text=True)
    (wheel,) = tmp_path.glob("edge_vila-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = set()
    for init in root.glob("edge_vila/**/__init__.py"):
        want |= {str(p.relative_to(root)) for p in init.parent.glob("*.py")}
    for folder in ("quant", "export", "jetson"):
        want |= {f"edge_vila/{p.relative_to(root)}" for p in (root / folder).rglob("*.py")}
    want |= {str(p.relative_to(root)) for p in (root / "edge_vila/backends/csrc").iterdir()}
    assert not want - names, sorted(want - names)
