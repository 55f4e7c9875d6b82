"""AWQ search, scale folding, AutoAWQ GEMM packing, quantized checkpoints."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edge_vila
from edge_vila.config import LLMSpec
from edge_vila.modeling.llm import DecoderLM
from edge_vila.quant.awq import (SCALE_GROUPS, AwqSettings, LayerRunner, apply_awq, fold_scale, run_awq, score_subset,
                                  search_scale)
from edge_vila.quant.rtn import QuantConfig, dequantize, fake_quant, quantize
from edge_vila.quantfmt import dequantize_linear, pack_cols, pack_linear, unpack_cols, unpack_linear


def test_awq_nibble_order_matches_hand_built_reference():
    # codes 0..7 in output columns 0..7: nibble i holds column [0,2,4,6,1,3,5,7][i]
    assert pack_cols(np.arange(8, dtype=np.uint8)[None]).view(np.uint32)[0, 0] == 0x75316420
    codes = np.array([[15, 0, 0, 0, 0, 0, 0, 1]], np.uint8)  # col 0 -> nibble 0, col 7 -> nibble 7
    assert pack_cols(codes).view(np.uint32)[0, 0] == 0x1000000F


def test_pack_unpack_roundtrip_and_dequant():
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.normal(size=(48, 256)).astype(np.float32))
    q = QuantConfig(4, 128, True)
    codes, s, z = quantize(w, q)
    packed = pack_linear(codes.numpy(), s.numpy(), z.numpy())
    assert packed["qweight"].shape == (256, 6) and packed["qweight"].dtype == np.int32
    assert packed["qzeros"].shape == (2, 6) and packed["scales"].shape == (2, 48)
    c2, s2, z2 = unpack_linear(packed["qweight"], packed["qzeros"], packed["scales"])
    assert (c2 == codes.numpy()).all() and (z2 == z.numpy()).all()
    ref = dequantize(codes, s.half().float(), z, 128).numpy()
    np.testing.assert_allclose(dequantize_linear(**packed), ref, rtol=0, atol=1e-6)
    assert np.abs(dequantize_linear(**packed) - w.numpy()).max() < 0.6  # 4-bit of N(0,1)
    r = rng.integers(0, 16, (7, 64)).astype(np.uint8)
    assert (unpack_cols(pack_cols(r)) == r).all()


def test_symmetric_mode_uses_fixed_zero_point():
    w = torch.randn(8, 64)
    codes, s, z = quantize(w, QuantConfig(4, 32, zero_point=False))
    assert (z == 8).all() and codes.max() <= 15
    assert (fake_quant(w, QuantConfig(4, 32, False)) - w).abs().max() < 0.5


def _spec(**kw) -> LLMSpec:
    base = dict(family="llama", vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                num_kv_heads=4, head_dim=64, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                attention_bias=False, tie_word_embeddings=False, max_position_embeddings=128, bos_token_id=None,
                eos_token_ids=[])
    base.update(kw)
    return LLMSpec(**base)


def _outlier_inputs(n=4, t=32, d=256, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=g)
    x[..., :4] *= 40.0  # a few salient channels, as in real LLM activations
    return x


@torch.no_grad()
def test_awq_error_not_worse_than_rtn_with_planted_outliers():
    torch.manual_seed(0)
    lm = DecoderLM(_spec()).eval()
    layer = lm.model.layers[0]
    runner = LayerRunner(lm, 32)
    x = _outlier_inputs()
    q = QuantConfig(4, 128, True)
    g = SCALE_GROUPS["llama"][2]  # post_attention_layernorm -> gate/up, inspected through the MLP
    h = layer.post_attention_layernorm(x)
    ref = layer.mlp(h)
    w0 = [layer.mlp.gate_proj.weight.clone(), layer.mlp.up_proj.weight.clone()]
    layer.mlp.gate_proj.weight.data, layer.mlp.up_proj.weight.data = fake_quant(w0[0], q), fake_quant(w0[1], q)
    rtn_err = float((layer.mlp(h) - ref).pow(2).mean())
    layer.mlp.gate_proj.weight.data, layer.mlp.up_proj.weight.data = w0
    s = search_scale(layer, runner, g, h, AwqSettings(quant=q))
    fold_scale(layer, g, s)
    h2 = layer.post_attention_layernorm(x)
    layer.mlp.gate_proj.weight.data = fake_quant(layer.mlp.gate_proj.weight.data, q)
    layer.mlp.up_proj.weight.data = fake_quant(layer.mlp.up_proj.weight.data, q)
    awq_err = float((layer.mlp(h2) - ref).pow(2).mean())
    assert awq_err <= rtn_err
    assert awq_err < 0.8 * rtn_err  # and clearly better when outliers exist


@torch.no_grad()
def test_scale_grid_scored_on_some_sequences_statistics_from_all():
    """score_blocks: the grid is scored on evenly spaced calibration sequences, mean|x| comes from
    every one; scoring all of them is the full search exactly."""
    x = torch.arange(10)[:, None, None].expand(10, 2, 3)
    assert score_subset(x, 4)[:, 0, 0].tolist() == [0, 3, 6, 9]
    assert score_subset(x, 0) is x and score_subset(x, 10) is x
    torch.manual_seed(0)
    lm = DecoderLM(_spec()).eval()
    layer, runner = lm.model.layers[0], LayerRunner(lm, 32)
    q, g = QuantConfig(4, 128, True), SCALE_GROUPS["llama"][2]
    h = layer.post_attention_layernorm(_outlier_inputs(n=8))
    full = search_scale(layer, runner, g, h, AwqSettings(quant=q, score_blocks=0))
    assert torch.equal(full, search_scale(layer, runner, g, h, AwqSettings(quant=q, score_blocks=8)))
    h[1, :, 10] *= 200  # a salient channel only in sequence 1, which 2 of 8 (0 and 7) do not score
    s = search_scale(layer, runner, g, h, AwqSettings(quant=q, score_blocks=2))
    xm = h.abs().reshape(-1, h.shape[-1]).mean(0)  # every sequence's statistics

    def cand(r):
        c = xm.pow(r / 20).clamp(min=1e-4)
        return c / (c.max() * c.min()).sqrt()

    assert not torch.allclose(s, torch.ones_like(s))  # a real scale, not the identity
    assert any(torch.allclose(s, cand(r)) for r in range(20))


@pytest.mark.parametrize("family,kv", [("llama", 4), ("qwen2", 2)])
@torch.no_grad()
def test_scale_folding_keeps_float_outputs(family, kv):
    torch.manual_seed(1)
    lm = DecoderLM(_spec(family=family, num_kv_heads=kv, attention_bias=family == "qwen2")).eval()
    for p in lm.parameters():
        p.data.normal_(0, 0.05)
    x = _outlier_inputs(2, 16)
    ref = lm(x, torch.arange(16))
    for layer in lm.model.layers:
        for g in SCALE_GROUPS[family]:
            prev, fc = layer.get_submodule(g.prev), layer.get_submodule(g.linears[0])
            if g.needs_same_shape and prev.weight.shape != fc.weight.shape:
                continue
            fold_scale(layer, g, torch.rand(fc.in_features) * 3 + 0.2)
    assert (lm(x, torch.arange(16)) - ref).abs().max() < 1e-5


@torch.no_grad()
def test_search_once_apply_many():
    torch.manual_seed(2)
    a = DecoderLM(_spec()).eval()
    b = DecoderLM(_spec()).eval()
    b.load_state_dict(a.state_dict())
    q = QuantConfig(4, 128, True)
    result = run_awq(a, _outlier_inputs(2, 32), AwqSettings(quant=q, n_grid=5), progress=False)
    assert any(k.endswith(".scale") for k in result) and any(k.endswith(".clip") for k in result)
    assert not any("q_proj.clip" in k or "k_proj.clip" in k for k in result)
    apply_awq(b, result, q)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), n


def test_quantized_checkpoint_loads_and_runs(tmp_path):
    from edge_vila.quant.quantize import QuantizeOptions, quantize_checkpoint
    from edge_vila.testing import make_tiny_checkpoint

    src = make_tiny_checkpoint(tmp_path / "f", llm_hidden=128, intermediate=256)
    rep = quantize_checkpoint(src, tmp_path / "q", QuantizeOptions(group_size=64, n_text=2, n_mm=2, seq_len=64,
                                                                    n_grid=4, eval=False), progress=False)
    assert rep["method"] == "awq"
    cfg = json.loads((tmp_path / "q" / "llm" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "awq" and cfg["quantization_config"]["version"] == "gemm"
    from safetensors.numpy import load_file

    sd = load_file(str(tmp_path / "q" / "llm" / "model.safetensors"))
    assert sd["model.layers.0.mlp.down_proj.qweight"].dtype == np.int32
    assert "model.layers.0.mlp.down_proj.weight" not in sd
    pipe = edge_vila.load(tmp_path / "q", max_context=256)
    assert pipe.cfg.llm.quantization["bits"] == 4
    assert isinstance(pipe.generate("hello", images=[np.zeros((8, 8, 3), np.uint8)], max_new_tokens=3), str)


def test_ragged_last_group_like_smollm2_576_at_g128():
    """576 inputs at g128: four full groups and a short fifth; packing and dequant agree."""
    torch.manual_seed(3)
    w = torch.randn(16, 576)
    q = QuantConfig(4, 128, True)
    codes, s, z = quantize(w, q)
    assert codes.shape == (16, 576) and s.shape == (16, 5)
    deq = dequantize(codes, s, z, 128)
    assert (deq - w).abs().max() < 0.6
    packed = pack_linear(codes.numpy(), s.numpy(), z.numpy())
    np.testing.assert_allclose(dequantize_linear(**packed, group_size=128), dequantize(codes, s.half().float(), z, 128),
                               atol=1e-6)
    # the short group's range comes only from its own 64 real columns
    w2 = w.clone()
    w2[:, 512:] *= 0.01
    _, s2, _ = quantize(w2, q)
    assert torch.allclose(s2[:, :4], s[:, :4]) and (s2[:, 4] < 0.05 * s[:, 4]).all()


def test_quantized_lm_head_roundtrip_and_bundle(tmp_path):
    """--quantize-lm-head: the head is packed too (tied embeddings stay float for the host
    lookup), the torch reference and the exported bundle agree."""
    from edge_vila.export.bundle import ExportOptions, export_bundle
    from edge_vila.export.report import PROMPTS, logit_agreement
    from edge_vila.quant.quantize import QuantizeOptions, quantize_checkpoint
    from edge_vila.testing import build_models, TinySpec

    llm, tok, *_ = build_models(TinySpec(llm_hidden=128, intermediate=256))
    llm.config.tie_word_embeddings = True
    llm.tie_weights()
    llm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    quantize_checkpoint(tmp_path / "lm", tmp_path / "q", QuantizeOptions(group_size=64, n_text=2, seq_len=64, n_grid=4,
                                                                         eval=False, lm_head=True), progress=False)
    from safetensors.numpy import load_file

    sd = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert "lm_head.qweight" in sd and sd["model.embed_tokens.weight"].dtype == np.float32
    ref = edge_vila.load(tmp_path / "q", max_context=256)
    assert ref.backend.vlm.llm.lm_head.weight.data_ptr() != ref.backend.vlm.llm.model.embed_tokens.weight.data_ptr()
    b = export_bundle(tmp_path / "q", tmp_path / "b", ExportOptions(group_size=64, max_context=256, report=False))
    res = logit_agreement(ref, edge_vila.load(b, exact=True), PROMPTS, steps=6)
    assert res["max_rel_logit_err"] <= 1e-3 and res["greedy_agreement"] == 1.0, res
