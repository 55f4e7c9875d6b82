"""The memory-frugal toolchain: tensor-at-a-time reads, streamed RTN and its layer-by-layer
quality check, INT4 linears kept 4-bit in the torch reference, llm.onnx with external data.
Each streamed result is checked against the whole-model computation it replaces."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edge_vila
from edge_vila.config import load_config
from edge_vila.bundle import BundleError
from edge_vila.errors import CheckpointError
from edge_vila.modeling.llm import Int4Linear, load_decoder
from edge_vila.modeling.weights import CheckpointWeights
from edge_vila.quant.quality import fake_quantize_model, perplexity
from edge_vila.quant.quantize import QuantizeOptions, pack_decoder, quantize_checkpoint
from edge_vila.quant.rtn import QuantConfig
from edge_vila.quant import stream
from edge_vila.quantfmt import dequantize_linear
from edge_vila.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def short_group_ckpt(tmp_path_factory):
    """Qwen2 (q/k/v biases) with 96 inputs per linear and group size 64: the last group is
    short, which is where a group size inferred from the scales' shape goes wrong."""
    root = tmp_path_factory.mktemp("shortg")
    src = make_tiny_checkpoint(root / "float", llm="qwen2", llm_hidden=96, intermediate=160, llm_heads=4,
                               llm_kv_heads=2, image_size=32)
    q = quantize_checkpoint(src, root / "rtn", QuantizeOptions(method="rtn", group_size=64, eval=False,
                                                                vision_int8="none"), progress=False)
    assert q["method"] == "rtn"
    return src, root / "rtn"


def test_checkpoint_weights_reads_every_dtype_exactly_and_names_bad_files(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    ts = {"bf16": torch.randn(5, 7, generator=g).bfloat16(), "f16": torch.randn(3, generator=g).half(),
          "f32": torch.randn(2, 2, 2, generator=g), "i32": torch.randint(-9, 9, (4, 3), dtype=torch.int32),
          "u8": torch.randint(0, 255, (6,), dtype=torch.uint8), "empty": torch.zeros(0, 4)}
    save_file(ts, str(tmp_path / "model.safetensors"))
    w = CheckpointWeights(tmp_path)
    for k, t in ts.items():
        got = w.get(k)
        assert got.dtype == t.dtype and tuple(got.shape) == tuple(t.shape) == w.shape(k)
        assert torch.equal(got, t)
    with pytest.raises(CheckpointError, match="'nope' not found"):
        w.get("nope")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor .* not readable"):
        CheckpointWeights(tmp_path)


def test_int4_reference_uses_the_config_group_size_with_a_short_last_group(short_group_ckpt):
    src, q = short_group_ckpt
    cfg, fcfg = load_config(q), load_config(src)
    assert cfg.llm.quantization["group_size"] == 64
    w = CheckpointWeights(cfg.llm_dir)
    lm = load_decoder(cfg.llm_dir, cfg.llm)
    flat = load_decoder(cfg.llm_dir, cfg.llm, int4_linears=False)
    fl = load_decoder(fcfg.llm_dir, fcfg.llm)
    base = "model.layers.1.self_attn.q_proj"
    mod = lm.get_submodule(base)
    assert isinstance(mod, Int4Linear) and mod.in_features == 96 and mod.scales.shape[1] == 2
    ref = dequantize_linear(w.get(base + ".qweight").numpy(), w.get(base + ".qzeros").numpy(),
                            w.get(base + ".scales").float().numpy(), 64)
    assert np.array_equal(mod.weight.numpy(), ref)
    assert np.array_equal(flat.get_submodule(base).weight.detach().numpy(), ref)
    # and it is the float weight, 4-bit rounded: within a step of its group's scale (half a
    # step, plus the zero point's rounding at the range's edge); a wrong group size is far off
    s = w.get(base + ".scales").float().numpy().T  # [out, G]
    step = s[:, np.arange(96) // 64]
    assert (np.abs(ref - fl.get_submodule(base).weight.detach().numpy()) <= step).all()
    with pytest.raises(CheckpointError, match="do not cover 96 inputs in groups of 128"):
        Int4Linear(np.zeros((4, 96), np.uint8), np.ones((4, 2), np.float32), np.zeros((4, 2), np.uint8), 128)


def test_streamed_rtn_is_byte_identical_to_the_whole_model_path(short_group_ckpt):
    src, _ = short_group_ckpt
    cfg = load_config(src)
    q = QuantConfig(4, 64, True)
    for lm_head in (False, True):
        streamed = dict(stream.rtn_state(CheckpointWeights(cfg.llm_dir), cfg.llm, q, lm_head, progress=False))
        whole = pack_decoder(load_decoder(cfg.llm_dir, cfg.llm), q, lm_head)
        assert set(streamed) == set(whole)
        for k in whole:
            assert torch.equal(streamed[k].float(), whole[k].float()), k


def test_write_shards_splits_indexes_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "SHARD_BYTES", 1000)
    items = [(f"t{i}", torch.full((100,), float(i))) for i in range(7)]  # 400 bytes each: 2 per shard
    files = stream.write_shards(iter(items), tmp_path, {"format": "pt"})
    assert [f.name for f in files] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["t6"] == "model-00004-of-00004.safetensors"
    w = CheckpointWeights(tmp_path)
    assert all(torch.equal(w.get(k), t) for k, t in items)
    assert not list(tmp_path.glob("*.tmp"))


def test_safetensors_writer_reads_back_with_safetensors_itself(tmp_path):
    """Our streaming writer against the library's reader: every dtype we store, a scalar,
    an empty tensor, numpy input, metadata; a failed write leaves no file behind."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from edge_vila.modeling.weights import SafetensorsWriter

    g = torch.Generator().manual_seed(0)
    ts = {"bf16": torch.randn(3, 5, generator=g).bfloat16(), "f16": torch.randn(7, generator=g).half(),
          "i32": torch.randint(-9, 9, (2, 4), dtype=torch.int32), "u8": torch.arange(5, dtype=torch.uint8),
          "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "strided": torch.randn(4, 6, generator=g).t()}
    with SafetensorsWriter(tmp_path / "a.safetensors", {"format": "pt"}) as wr:
        for k, t in ts.items():
            wr.add(k, t)
        wr.add("np", np.arange(6, dtype=np.float32).reshape(2, 3))
    back = load_file(str(tmp_path / "a.safetensors"))
    assert all(back[k].dtype == t.dtype and torch.equal(back[k], t) for k, t in ts.items())
    assert torch.equal(back["np"], torch.arange(6.0).reshape(2, 3))
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert (tmp_path / "a.safetensors").read_bytes()[8:].index(b"{") == 0
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(tmp_path / "b.safetensors") as wr:
            wr.add("x", torch.ones(3))
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_layer_by_layer_quality_matches_the_whole_model_perplexity(short_group_ckpt):
    src, _ = short_group_ckpt
    cfg = load_config(src)
    q = QuantConfig(4, 64, True)
    ids = torch.randint(0, cfg.llm.vocab_size, (3 * 64,), generator=torch.Generator().manual_seed(1))
    res = stream.streamed_rtn_quality(CheckpointWeights(cfg.llm_dir), cfg.llm, ids, q, seq_len=64, progress=False)
    fl = load_decoder(cfg.llm_dir, cfg.llm)
    want_f = perplexity(fl, ids[:192], seq_len=64)["perplexity"]
    want_q = perplexity(fake_quantize_model(fl, q), ids[:192], seq_len=64)["perplexity"]
    assert res["perplexity"]["float"] == pytest.approx(want_f, rel=1e-4)
    assert res["perplexity"]["rtn"] == pytest.approx(want_q, rel=1e-4)
    assert len(res["layer_error"]["rtn"]) == cfg.llm.num_layers and all(e > 0 for e in res["layer_error"]["rtn"])
    assert stream.auto_eval_tokens(cfg.llm, 30_000) == 30_000  # a tiny model gets every token asked


def test_bundle_keeps_llm_weights_in_hashed_external_data(short_group_ckpt, tmp_path):
    import onnx

    from edge_vila.export.bundle import ExportOptions, export_bundle
    from edge_vila.export.report import PROMPTS, logit_agreement

    _, q = short_group_ckpt
    # float32 KV I/O: the check below is of the weights, at 1e-4 (the float16 cache rounds K/V)
    b = export_bundle(q, tmp_path / "b", ExportOptions(vision_quant="fp32", max_context=256, report=False,
                                                       kv_dtype="fp32"))
    man = json.loads((b / "manifest.json").read_text())
    assert "llm.onnx.data" in man["files"] and not (b / "vision.onnx.data").exists()
    m = onnx.load(str(b / "llm.onnx"), load_external_data=False)
    ext = [i for i in m.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert any(".q4__q" in i.name for i in ext) and all(i.data_location == onnx.TensorProto.EXTERNAL
                                                      for i in m.graph.initializer if len(i.raw_data) > 1024)
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and {a.i for n in dq for a in n.attribute if a.name == "block_size"} == {64}
    ref = edge_vila.load(q, max_context=256)
    res = logit_agreement(ref, edge_vila.load(b, exact=True, variant="bundle"), PROMPTS[:2], steps=4)
    assert res["greedy_agreement"] == 1.0 and res["max_rel_logit_err"] <= 1e-4
    data = bytearray((b / "llm.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "llm.onnx.data").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="llm.onnx.data: sha256 mismatch"):
        edge_vila.load(b)


def test_streamed_awq_search_equals_the_whole_model_search(short_group_ckpt):
    from edge_vila.prompt import TextTokenizer
    from edge_vila.quant.awq import AwqSettings, apply_awq, run_awq
    from edge_vila.quant.calib import calibration_embeds

    src, _ = short_group_ckpt
    cfg = load_config(src)
    w = CheckpointWeights(cfg.llm_dir)
    st = AwqSettings(quant=QuantConfig(4, 64, True), n_grid=4)
    calib = calibration_embeds(stream.embedding_module(w, cfg.llm), TextTokenizer(cfg.llm_dir), 4, 32)
    result: dict = {}
    streamed = dict(stream.awq_state(w, cfg.llm, st, result, calib, progress=False))
    lm = load_decoder(cfg.llm_dir, cfg.llm)
    want = run_awq(lm, calib, st, progress=False)
    assert set(result) == set(want) and all(torch.equal(result[k], want[k]) for k in want)
    whole = pack_decoder(lm, st.quant)
    assert set(streamed) == set(whole)
    for k in whole:
        assert torch.equal(streamed[k].float(), whole[k].float()), k
    # re-applying the saved result layer by layer gives the same tensors again
    again = dict(stream.awq_state(w, cfg.llm, st, result, None, progress=False))
    assert all(torch.equal(again[k].float(), whole[k].float()) for k in whole)
    fresh = load_decoder(cfg.llm_dir, cfg.llm)
    apply_awq(fresh, result, st.quant)
    assert all(torch.equal(pack_decoder(fresh, st.quant)[k].float(), whole[k].float()) for k in whole)


@pytest.mark.slow
def test_quantize_and_export_never_hold_a_float32_copy_of_the_llm(tmp_path):
    """A 4-layer replica at VILA1.5-3B's widths (0.48B LLM parameters: 1.9 GB as float32):
    quantize (RTN) and export each stay below that in peak RSS, so the whole-model float
    copies that made the full-size export run out of memory cannot come back unnoticed."""
    import subprocess
    import sys

    from edge_vila.replicas import make_replica

    src = make_replica(tmp_path / "r", "VILA1.5-3b", llm_layers=4, vision_layers=2)
    fp32_bytes = 4 * load_config(src).llm.num_params

    def peak(*args) -> float:
        """The CLI's own high-water RSS (VmHWM: counted from its exec; a forked child's
        ru_maxrss would include the test process's RSS at fork time)."""
        hwm = tmp_path / "hwm"
        code = ("import runpy, sys\n"
                f"sys.argv = ['edge-vila'] + {[str(x) for x in args]!r}\n"
                "try:\n    runpy.run_module('edge_vila', run_name='__main__')\n"
                "finally:\n"
                "    line = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
                f"    open({str(hwm)!r}, 'w').write(line.split()[1])\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return int(hwm.read_text()) * 1024

    q = peak("quantize", src, "--out", tmp_path / "q", "--method", "rtn", "--no-eval", "--vision-int8", "none")
    e = peak("export", tmp_path / "q", "--out", tmp_path / "b", "--vision-quant", "fp32", "--no-report",
             "--max-context", "256")
    print(f"peak RSS: quantize {q / 1e9:.2f} GB, export {e / 1e9:.2f} GB, float32 LLM {fp32_bytes / 1e9:.2f} GB")
    assert q < fp32_bytes and e < fp32_bytes, (q / 1e9, e / 1e9, fp32_bytes / 1e9)


def test_quantize_device_choice_and_its_errors():
    """--device: auto is CUDA only where torch sees a GPU; asking for CUDA without one, or for
    an unknown device, is one line naming the option (the CUDA results: tests/test_quant_gpu.py)."""
    from edge_vila.errors import InputError
    from edge_vila.quant.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="--device 'tpu' unknown"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="--device cuda: torch sees no CUDA device"):
            resolve_device("cuda")
