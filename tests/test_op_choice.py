"""The fast graph's default ops are measured on this machine (backends/op_choice.py): the
timing runs once per op library and model shape, its record is reused, a record of another
library build is not, and a load follows the record."""
from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from edge_vila.backends import native_ops, op_choice  # noqa: E402
from edge_vila.backends.op_choice import OpChoice, Shape  # noqa: E402

SMALL = Shape(hidden=128, intermediate=256, num_heads=4, kv_heads=2, head_dim=32, block=32, positions=200, threads=2,
              num_layers=2)


@pytest.fixture()
def lib(tmp_path):
    return native_ops.build_library(tmp_path / "ops")


def test_measured_once_recorded_and_reused(lib, monkeypatch):
    first = op_choice.choose(lib, SMALL)
    assert first.matmul in ("edge", "nbits") and first.attention in ("edge", "gqa")
    assert first.kernel in native_ops.kernels(lib)
    us = first.us
    assert all(us[k] > 0 for k in ("edge_mlp", "nbits_mlp", "edge_attention_pool", "gqa"))
    best = min((v, k) for k, v in us.items() if k.startswith("layer_"))[1]
    assert best == f"layer_{first.matmul}_{first.attention}"  # the pair with the shortest layer
    rec = json.loads(lib.with_name(lib.name + ".choice.json").read_text())
    assert rec["library_sha256"] == native_ops.sha256_file(lib) and SMALL.key() in rec["choices"]

    def no_timing(*a):
        raise AssertionError("measured again")

    monkeypatch.setattr(op_choice, "measure", no_timing)
    assert op_choice.choose(lib, SMALL) == first  # from the record
    with pytest.raises(AssertionError, match="measured again"):  # another shape is timed
        op_choice.choose(lib, Shape(**{**SMALL.__dict__, "threads": 1}))


def test_record_of_another_build_or_unreadable_is_measured_again(lib, monkeypatch, caplog):
    path = lib.with_name(lib.name + ".choice.json")
    fake = OpChoice("nbits", "gqa", {"x": 1.0}, "portable")
    calls = []
    monkeypatch.setattr(op_choice, "measure", lambda l, s: calls.append(s) or fake)
    path.write_text(json.dumps({"library_sha256": "0" * 64, "choices": {SMALL.key(): fake.__dict__}}))
    assert op_choice.choose(lib, SMALL) == fake and len(calls) == 1
    assert "recorded for another build of the library" in caplog.text
    path.write_text("{not json")
    assert op_choice.choose(lib, SMALL) == fake and len(calls) == 2
    assert "unreadable" in caplog.text
    rec = json.loads(path.read_text())
    path.write_text(json.dumps({**rec, "method": op_choice.METHOD - 1}))  # an older timing method's record
    with caplog.at_level(logging.INFO):
        assert op_choice.choose(lib, SMALL) == fake and len(calls) == 3
    assert "older timing method" in caplog.text


def test_an_onnxruntime_whose_gqa_cannot_read_the_int8_cache():
    """The probe on the installed onnxruntime: GroupQueryAttention took k_scale / v_scale over an
    INT8 cache from 1.24 on (1.23.2 refuses them: the aarch64 check runs it)."""
    import onnxruntime as ort

    major, minor = (int(p) for p in ort.__version__.split(".")[:2])
    why = op_choice.gqa_int8_unsupported()
    if (major, minor) >= (1, 24):
        assert why is None
    else:
        assert why and ort.__version__ in why


def test_where_gqa_cannot_read_the_int8_cache_only_our_attention_is_timed(lib, monkeypatch, caplog):
    """As on onnxruntime 1.23 (a Jetson's may be older): measure() times no GQA and picks our
    attention; the choice is recorded with the onnxruntime version, and a record made with
    another version is measured again."""
    monkeypatch.setattr(op_choice, "gqa_int8_unsupported", lambda: "onnxruntime 1.23.2: input size 14 not in range")
    timed = []
    monkeypatch.setattr(op_choice, "_time_in_child", lambda l, s, op: timed.append(op) or 10.0)
    with caplog.at_level(logging.INFO):
        got = op_choice.choose(lib, SMALL)
    assert got.attention == "edge" and not [op for op in timed if op.startswith("gqa")]
    assert "timing our attention only" in caplog.text
    path = lib.with_name(lib.name + ".choice.json")
    rec = json.loads(path.read_text())
    import onnxruntime as ort
    assert rec["onnxruntime"] == ort.__version__
    path.write_text(json.dumps({**rec, "onnxruntime": "1.0.0"}))
    n = len(timed)
    with caplog.at_level(logging.INFO):
        op_choice.choose(lib, SMALL)
    assert len(timed) > n and "recorded with onnxruntime 1.0.0" in caplog.text
