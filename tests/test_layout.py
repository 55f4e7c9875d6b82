"""The import rules the layout stands for, read from the source (so a lazy import inside a
function counts too): the runtime and the toolchain never reach into the training recipe;
the device runtime imports neither torch nor the toolchain when a module is imported."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "edge_vila"
# entry points and test helpers that may reach everything (each verb imports what it runs)
ENTRY_POINTS = {"cli.py", "cli_device.py", "cli_stream.py", "testing.py", "replicas.py", "__main__.py"}
TORCH_SIDE = {"modeling", "train"}  # the torch reference and the recipe: workstation only
TORCH_BACKEND = Path("backends/torch.py")  # runs checkpoints, loaded only for them


def _imports(path: Path, package: str) -> list[tuple[str, bool]]:
    """(absolute module name, at module level?) for every import in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((name, id(node) in top))
    return out


def _modules(folder: Path, package: str):
    for p in sorted(folder.rglob("*.py")):
        rel = p.relative_to(folder)
        yield p, rel, ".".join([package, *rel.parts[:-1]])  # what a relative import is relative to


def _runtime_modules():
    for p, rel, pkg in _modules(PKG, "edge_vila"):
        if rel.parts[0] in TORCH_SIDE or rel == TORCH_BACKEND or (len(rel.parts) == 1 and rel.name in ENTRY_POINTS):
            continue
        yield p, rel, pkg


def test_nothing_outside_the_recipe_imports_edge_vila_train():
    bad = []
    folders = [(PKG, "edge_vila")] + [(ROOT / d, f"edge_vila.{d}") for d in ("quant", "export", "jetson")]
    for folder, package in folders:
        for p, rel, pkg in _modules(folder, package):
            if package == "edge_vila" and (rel.parts[0] == "train" or rel.name in ENTRY_POINTS):
                continue
            bad += [f"{p.relative_to(ROOT)}: imports {name}" for name, _ in _imports(p, pkg)
                    if name == "edge_vila.train" or name.startswith("edge_vila.train.")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("forbidden", ["torch", "transformers", "edge_vila.quant", "edge_vila.export"])
def test_the_device_runtime_imports_no_torch_or_toolchain_at_module_level(forbidden):
    bad = [f"{p.relative_to(ROOT)}: imports {name} at module level"
           for p, _, pkg in _runtime_modules() for name, top in _imports(p, pkg)
           if top and (name == forbidden or name.startswith(forbidden + "."))]
    assert not bad, "\n".join(bad)


def test_the_rules_see_the_imports_they_forbid(tmp_path):
    """The checker itself: a relative import two levels up and a lazy one are both found."""
    f = tmp_path / "m.py"
    f.write_text("from ..train import world\ndef g():\n    import torch\n")
    assert _imports(f, "edge_vila.backends") == [("edge_vila.train", True), ("torch", False)]
