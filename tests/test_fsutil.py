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
            (d / "sub").mkdir(mode=0o700)
            os.close(os.open(d / "sub" / "w.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))  # as save_file makes it
            os.close(os.open(d / "run.sh", os.O_CREAT | os.O_WRONLY, 0o700))
    finally:
        os.umask(old)
    mode = lambda *p: stat.S_IMODE(tmp_path.joinpath(*p).stat().st_mode)
    assert mode("m.json") == mode("bundle", "f") == mode("bundle", "sub", "w.safetensors") == 0o666 & ~mask
    assert mode("bundle") == mode("bundle", "sub") == mode("bundle", "run.sh") == 0o777 & ~mask


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_saved_safetensors_get_the_umask_mode(tmp_path, mask):
    """safetensors' save_file creates its file 0600 whatever the umask; written inside an
    atomic_dir (every checkpoint, replica, INT8-calibration and training-state writer is) it
    ends with open()'s mode."""
    import os
    import stat

    import torch
    from safetensors.torch import load_file, save_file

    old = os.umask(mask)
    try:
        with atomic_dir(tmp_path / "ckpt") as d:
            save_file({"w": torch.ones(2, 3)}, str(d / "w.safetensors"), metadata={"format": "pt"})
    finally:
        os.umask(old)
    path = tmp_path / "ckpt" / "w.safetensors"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert torch.equal(load_file(str(path))["w"], torch.ones(2, 3))


def test_a_files_digest_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    """checked_sha256 hashes a file once per version: its cached digest is what a later check
    returns while the file's device, inode, size, mtime and ctime stay; any write moves ctime,
    even one that puts size and mtime back; EDGE_VILA_VERIFY=full always hashes."""
    import json
    import os
    import time

    from edge_vila.fsutil import cache_home, checked_sha256, sha256_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    f = tmp_path / "llm.onnx.data"
    f.write_bytes(os.urandom(4096))
    real = sha256_file(f)
    assert checked_sha256(f) == real
    assert not list((cache_home() / "digests").glob("*.json"))  # changed just now: not remembered yet
    time.sleep(2.1)
    assert checked_sha256(f) == real
    (memo,) = (cache_home() / "digests").glob("*.json")
    rec = json.loads(memo.read_text())
    rec["sha256"] = "f" * 64  # what the next check returns proves it did not hash again
    memo.write_text(json.dumps(rec))
    assert checked_sha256(f) == "f" * 64
    monkeypatch.setenv("EDGE_VILA_VERIFY", "full")
    assert checked_sha256(f) == real
    monkeypatch.delenv("EDGE_VILA_VERIFY")
    st = f.stat()
    with open(f, "r+b") as fh:  # same size, and the mtime put back afterwards
        fh.seek(100)
        fh.write(b"\x00" * 8)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert checked_sha256(f) == sha256_file(f) != real


def test_remembered_digests_of_deleted_files_are_pruned(tmp_path, monkeypatch):
    import json

    from edge_vila.fsutil import _prune

    d = tmp_path / "digests"
    d.mkdir()
    live = tmp_path / "live.bin"
    live.write_bytes(b"x")
    for i in range(6):
        (d / f"{i}.json").write_text(json.dumps({"path": str(live if i < 2 else tmp_path / f"gone{i}")}))
    _prune(d, keep=10)
    assert len(list(d.glob("*.json"))) == 6
    _prune(d, keep=3)
    assert sorted(p.name for p in d.glob("*.json")) == ["0.json", "1.json"]
