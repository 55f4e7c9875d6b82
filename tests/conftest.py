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
