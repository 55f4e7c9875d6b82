from __future__ import annotations

import pytest

from edge_vila.fsutil import atomic_dir, atomic_write_json, read_json
from edge_vila.errors import CheckpointError


def test_interrupted_folder_write_keeps_the_old_artifact(tmp_path):
    out = tmp_path / "art"
    with atomic_dir(out) as d:
        (d / "a.txt").write_text("v1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as d:
            (d / "a.txt").write_text("half")
            raise KeyboardInterrupt
    assert (out / "a.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temp leftovers
    with atomic_dir(out) as d:
        (d / "a.txt").write_text("v2")
    assert (out / "a.txt").read_text() == "v2"


def test_json_roundtrip_and_errors(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert read_json(tmp_path / "x.json") == {"a": 1}
    (tmp_path / "y.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        read_json(tmp_path / "y.json")


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_artifacts_get_the_umask_modes_not_the_temp_files(tmp_path, mask):
    """mkstemp/mkdtemp make 0600/0700 temps; once renamed into place a bundle must be as readable
    as anything else its user writes (a robot's container often runs as another user)."""
    import os
    import stat

    old = os.umask(mask)
    try:
        atomic_write_json(tmp_path / "m.json", {"a": 1})
        with atomic_dir(tmp_path / "bundle") as d:
            (d / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "bundle").stat().st_mode) == 0o777 & ~mask
