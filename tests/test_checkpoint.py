"""VILA layout: write/read every supported combination; bad checkpoints fail in one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import edge_vila
from edge_vila.config import load_config
from edge_vila.errors import CheckpointError, ContextOverflowError, InputError
from edge_vila.modeling.projector import fold
from edge_vila.testing import make_tiny_checkpoint


@pytest.mark.parametrize("llm,vision,projector,feature", [
    ("llama", "siglip", "mlp_downsample", "cls_patch"),
    ("qwen2", "clip", "mlp2x_gelu", "patch"),
    ("llama", "clip", "linear", "cls_patch"),
    ("qwen2", "siglip", "linear", "patch"),
])
def test_layout_roundtrip_and_forward(tmp_path, llm, vision, projector, feature):
    ckpt = make_tiny_checkpoint(tmp_path / "c", llm=llm, vision=vision, projector=projector,
                                select_feature=feature, template="hermes-2" if llm == "qwen2" else "vicuna_v1")
    top = json.loads((ckpt / "config.json").read_text())
    assert top["architectures"] == ["LlavaLlamaModel"]
    assert {"llm_cfg", "vision_tower_cfg", "mm_projector_cfg", "mm_projector_type", "mm_vision_select_layer",
            "mm_vision_select_feature", "image_aspect_ratio"} <= set(top)
    for sub in ("llm/config.json", "llm/tokenizer.json", "vision_tower/config.json",
                "vision_tower/preprocessor_config.json", "mm_projector/config.json", "mm_projector/model.safetensors"):
        assert (ckpt / sub).is_file(), sub
    cfg = load_config(ckpt)
    patches = (32 // 4) ** 2 + (1 if vision == "clip" and feature == "cls_patch" else 0)
    want = 16 if projector == "mlp_downsample" else patches
    assert cfg.tokens_per_image == want
    pipe = edge_vila.load(ckpt, max_context=256)
    emb = pipe.backend.encode_images(np.zeros((2, 3, 32, 32), np.float32))
    assert emb.shape == (2, want, 64)
    assert isinstance(pipe.generate("hi", images=[np.zeros((8, 8, 3), np.uint8)], max_new_tokens=3), str)


def _vila_fold_reference(x: torch.Tensor) -> torch.Tensor:
    """VILA DownSampleBlock's sequence of views, spelled out as the format definition."""
    n, length, c = x.shape
    s = int(length ** 0.5)
    x = x.reshape(n, s, s, c)
    if s % 2:
        x = torch.cat([x, torch.zeros(n, 1, s, c)], 1)
        x = torch.cat([x, torch.zeros(n, s + 1, 1, c)], 2)
    n, w, h, c = x.shape
    x = x.reshape(n, w, h // 2, c * 2).permute(0, 2, 1, 3).reshape(n, h // 2, w // 2, c * 4)
    return x.permute(0, 2, 1, 3).reshape(n, -1, c * 4)


@pytest.mark.parametrize("side", [4, 5, 27])
def test_fold_2x2_matches_vila_layout(side):
    x = torch.randn(2, side * side, 3)
    assert torch.equal(fold(x, 2), _vila_fold_reference(x))
    s2 = (side + 1) // 2
    assert fold(x, 2).shape == (2, s2 * s2, 12)


# ---- bad input: one line that names the file/key and what was expected ----------------

def _copy(ckpt, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(ckpt, dst)
    return dst


@pytest.mark.parametrize("kind", ["siglip", "clip"])
@pytest.mark.parametrize("select_layer", [-2, -1, 1])
def test_vision_tower_runs_only_up_to_the_selected_layer(kind, select_layer):
    """The truncated forward must equal HF's own hidden_states[select_layer]."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    from edge_vila.modeling.vision import VisionTower, vision_model_class

    cfg = {"siglip": SiglipVisionConfig, "clip": CLIPVisionConfig}[kind](
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = vision_model_class(kind)(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    want = model(pixel_values=x, output_hidden_states=True).hidden_states[select_layer]
    want = want[:, 1:] if kind == "clip" else want
    got = VisionTower(model, select_layer, "patch", kind == "clip")(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_config(tmp_path / "nope")


def test_missing_subfolder_and_file(tiny_ckpt, tmp_path):
    c = _copy(tiny_ckpt, tmp_path)
    shutil.rmtree(c / "mm_projector")
    with pytest.raises(CheckpointError, match=r"mm_projector: missing sub-folder"):
        load_config(c)
    c2 = _copy(tiny_ckpt, tmp_path / "2")
    (c2 / "llm" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"llm/config.json: missing LLM config"):
        load_config(c2)
    c3 = _copy(tiny_ckpt, tmp_path / "3")
    (c3 / "vision_tower" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"vision_tower: no \*.safetensors"):
        load_config(c3)


def test_unknown_projector_type(tiny_ckpt, tmp_path):
    c = _copy(tiny_ckpt, tmp_path)
    p = c / "mm_projector" / "config.json"
    p.write_text(json.dumps({"mm_projector_type": "qformer"}))
    with pytest.raises(CheckpointError, match=r"mm_projector/config.json: mm_projector_type 'qformer'.*expected"):
        load_config(c)


def test_projector_llm_hidden_mismatch(tiny_ckpt, tmp_path):
    c = _copy(tiny_ckpt, tmp_path)
    cfg = json.loads((c / "llm" / "config.json").read_text())
    cfg["hidden_size"] = 96
    (c / "llm" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"layers.2.weight' has shape \[64, 128\], expected \[96, 128\]"):
        load_config(c)


def test_bad_json_and_bad_select_feature(tiny_ckpt, tmp_path):
    c = _copy(tiny_ckpt, tmp_path)
    (c / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_config(c)
    c2 = _copy(tiny_ckpt, tmp_path / "2")
    top = json.loads((c2 / "config.json").read_text())
    top["mm_vision_select_feature"] = "cls"
    (c2 / "config.json").write_text(json.dumps(top))
    with pytest.raises(CheckpointError, match="mm_vision_select_feature 'cls'"):
        load_config(c2)


def test_pickle_weights_are_refused(tiny_ckpt, tmp_path):
    c = _copy(tiny_ckpt, tmp_path)
    (c / "llm" / "model.safetensors").rename(c / "llm" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_config(c)


def test_image_that_is_not_an_image(tiny_pipe, tmp_path):
    bad = tmp_path / "photo.png"
    bad.write_text("definitely not a png")
    with pytest.raises(InputError, match=r"photo.png: not an image"):
        tiny_pipe.generate("what?", images=[bad])
    with pytest.raises(InputError, match="image file not found"):
        tiny_pipe.generate("what?", images=[tmp_path / "missing.jpg"])


def test_prompt_longer_than_context(tiny_ckpt):
    pipe = edge_vila.load(tiny_ckpt, max_context=32)
    with pytest.raises(ContextOverflowError, match=r"prompt is \d+ tokens .* context holds 32"):
        pipe.generate("word " * 100)


def test_text_only_model_refuses_images(tmp_path):
    from edge_vila.testing import build_models, TinySpec

    llm, tok, *_ = build_models(TinySpec())
    llm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    pipe = edge_vila.load(tmp_path / "lm", max_context=256)
    assert not pipe.cfg.is_multimodal
    assert isinstance(pipe.generate("hello", max_new_tokens=3), str)
    with pytest.raises(InputError, match="text-only model"):
        pipe.generate("hello", images=[np.zeros((4, 4, 3), np.uint8)])


def _vila_fold3_reference(x: torch.Tensor) -> torch.Tensor:
    """VILA DownSample3x3BlockFix's views (flat_square_3x3), spelled out as the format definition."""
    n, length, c = x.shape
    s = int(length ** 0.5)
    x = x.reshape(n, s, s, c)
    if s % 3:
        x = torch.cat([x, torch.zeros(n, 3 - s % 3, s, c)], 1)
        x = torch.cat([x, torch.zeros(n, x.shape[1], 3 - s % 3, c)], 2)
    n, w, h, c = x.shape
    x = x.reshape(n, w, h // 3, c * 3).permute(0, 2, 1, 3).reshape(n, h // 3, w // 3, c * 9)
    return x.permute(0, 2, 1, 3).reshape(n, -1, c * 9)


@pytest.mark.parametrize("side", [3, 4, 5, 32])
def test_fold_3x3_matches_vila_layout(side):
    from edge_vila.modeling.projector import fold

    x = torch.randn(2, side * side, 3)
    assert torch.equal(fold(x, 3), _vila_fold3_reference(x))
    assert fold(x, 3).shape == (2, (-(-side // 3)) ** 2, 27)


def test_fold_3x3_by_hand():
    """A 4x4 grid of one channel holding 0..15 row by row pads to 6x6 with zeros; output
    cell (a, b) is the 3x3 block at rows 3a.., columns 3b.., read row by row, and the cells
    come out row-major: (0,0) (0,1) (1,0) (1,1)."""
    from edge_vila.modeling.projector import fold

    x = torch.arange(16.0).reshape(1, 16, 1)
    got = fold(x, 3)[0].tolist()
    assert got == [[0, 1, 2, 4, 5, 6, 8, 9, 10],
                   [3, 0, 0, 7, 0, 0, 11, 0, 0],
                   [12, 13, 14, 0, 0, 0, 0, 0, 0],
                   [15, 0, 0, 0, 0, 0, 0, 0, 0]]


def test_nvila_lite_tokens_per_tile():
    """SigLIP at 448 px, patch 14: 32x32 = 1024 patches (no CLS); the 3x3 fold pads to 33x33
    and gives 11x11 = 121 tokens per tile — 1024 // 9 would be 113, the padding matters."""
    from edge_vila.config import ProjectorSpec

    assert ProjectorSpec("mlp_downsample_3x3_fix", 1152, 1536).num_tokens(1024) == 121
    assert ProjectorSpec("mlp_downsample_2x2_fix", 1152, 1536).num_tokens(729) == 196
