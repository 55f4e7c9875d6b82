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
