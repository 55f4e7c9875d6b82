"""NVIDIA's released VILA-family layouts, on random-weight replicas at full width.

A replica (edge_vila.replicas) has the release's config.json fields, folder and tensor
names, bf16 shards with their index and tokenizer kind; only the layer count is cut.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edge_vila.bundle import read_manifest
from edge_vila.config import load_config
from edge_vila.errors import CheckpointError
from edge_vila.released import LAYOUTS, get_layout, template_for_name


def cli(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_vila", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def vila15_3b(tmp_path_factory):
    from edge_vila.replicas import make_replica

    return make_replica(tmp_path_factory.mktemp("rel") / "VILA1.5-3b", "VILA1.5-3b", llm_layers=2, vision_layers=3)


def test_vila15_3b_replica_is_the_released_layout(vila15_3b):
    root = vila15_3b
    top = json.loads((root / "config.json").read_text())
    assert top["_name_or_path"] == "Efficient-Large-Model/VILA1.5-3b" and top["architectures"] == ["LlavaLlamaModel"]
    assert (top["mm_vision_select_feature"], top["mm_vision_select_layer"], top["image_aspect_ratio"]) == \
        ("cls_patch", -2, "resize")
    assert "chat_template" not in top  # the release names no template: VILA picks it by name
    llm = sorted(p.name for p in (root / "llm").iterdir())
    assert "tokenizer.model" in llm and "tokenizer.json" not in llm  # sentencepiece only, as released
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json"} <= set(llm)
    index = json.loads((root / "llm" / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["model.embed_tokens.weight"] == "model-00001-of-00002.safetensors"
    assert index["weight_map"]["lm_head.weight"] == "model-00002-of-00002.safetensors"
    from safetensors import safe_open

    with safe_open(str(root / "llm" / "model-00001-of-00002.safetensors"), "pt") as f:
        emb = f.get_slice("model.embed_tokens.weight")
        assert emb.get_shape() == [32000, 2560] and emb.get_dtype() == "BF16"
    with safe_open(str(root / "vision_tower" / "model.safetensors"), "pt") as f:
        assert "vision_model.embeddings.patch_embedding.weight" in f.keys()
    with safe_open(str(root / "mm_projector" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["layers.1.bias", "layers.1.weight", "layers.2.bias", "layers.2.weight",
                                    "layers.4.bias", "layers.4.weight"]


def test_vila15_3b_tokens_per_image_and_template(vila15_3b):
    cfg = load_config(vila15_3b)
    # SigLIP-so400m at 384 px, patch 14: 384 // 14 = 27, a 27x27 = 729-patch grid. SigLIP has no
    # class token, so cls_patch keeps all 729. mlp_downsample folds 2x2 after padding the odd
    # side to 28: (28/2)^2 = 14x14 = 196 tokens per image.
    assert cfg.num_patches == 729 and cfg.tokens_per_image == 196
    assert (cfg.llm.hidden_size, cfg.llm.vocab_size, cfg.vision.hidden_size) == (2560, 32000, 1152)
    assert cfg.chat_template == "vicuna_v1" and "VILA1.5-3b" in cfg.template_source


def test_templates_follow_vilas_name_mapping():
    assert template_for_name("Efficient-Large-Model/VILA1.5-3b") == "vicuna_v1"
    assert template_for_name("Efficient-Large-Model/VILA1.5-13b") == "vicuna_v1"
    assert template_for_name("Efficient-Large-Model/Llama-3-VILA1.5-8B") == "llama_3"
    assert template_for_name("Efficient-Large-Model/VILA1.5-40b") == "hermes-2"
    assert template_for_name("Efficient-Large-Model/NVILA-8B") is None  # NVILA: the tokenizer's own template
    for lay in LAYOUTS.values():
        assert template_for_name(lay.repo) in (lay.template, None)


def test_sentencepiece_only_tokenizer_encodes_as_sentencepiece(vila15_3b):
    """The tokenizer.json we convert to (and ship in the bundle) gives sentencepiece's own
    ids, including text that starts with a space (sentencepiece's dummy prefix)."""
    import sentencepiece as spm

    from edge_vila.prompt import TextTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(vila15_3b / "llm" / "tokenizer.model"))
    tok = TextTokenizer(vila15_3b / "llm")
    texts = ["A chat between a curious user and an artificial intelligence assistant. USER: ",
             "\nWhat color is the circle? ASSISTANT:", " What is on the left?", "  two spaces", "x ", " ",
             "Zahlen 1234567 und Umlaute äöü, 日本語, emoji \U0001F916", "tabs\tand\nnewlines\n\n", ""]
    for t in texts:
        assert tok.encode(t) == sp.encode(t), t
        assert tok.decode(sp.encode(t)) == sp.decode(sp.encode(t)), t
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)


def test_llama3_vila_8b_replica_tokenizer_and_template(tmp_path):
    from edge_vila.prompt import TextTokenizer
    from edge_vila.replicas import make_replica

    root = make_replica(tmp_path / "Llama-3-VILA1.5-8B", "Llama-3-VILA1.5-8B", llm_layers=1, vision_layers=2)
    cfg = load_config(root)
    assert cfg.chat_template == "llama_3" and cfg.tokens_per_image == 196
    assert (cfg.llm.hidden_size, cfg.llm.num_kv_heads, cfg.llm.vocab_size, cfg.llm.rope_theta) == \
        (4096, 8, 128256, 500000.0)
    tok = TextTokenizer(root / "llm")
    assert tok.token_id("<|eot_id|>") == 128009 and tok.token_id("<|begin_of_text|>") == 128000
    assert tok.vocab_size == 128256 and tok.eos_id == 128009
    shards = sorted(p.name for p in (root / "llm").glob("model-*.safetensors"))
    assert 2 <= len(shards) <= 4 and (root / "llm" / "model.safetensors.index.json").is_file()  # fewer layers, fewer shards


@pytest.mark.parametrize("edit, needle", [
    (lambda top: top.update(image_aspect_ratio="dynamic_s2"),
     "dynamic_s2 None disagrees with image_aspect_ratio 'dynamic_s2' (NVILA sets both)"),
    (lambda top: top.update(image_aspect_ratio="anyres"),
     "image_aspect_ratio 'anyres' is not supported (expected one of resize, pad, dynamic, dynamic_s2)"),
    (lambda top: top.update(s2=True), "s2 true (fixed multi-scale S2 features) is not supported"),
    (lambda top: top.update(image_aspect_ratio="dynamic", max_tiles=0), "key 'max_tiles' should be a positive integer"),
    (lambda top: top.update(image_aspect_ratio="dynamic", min_tiles=6, max_tiles=4),
     "min_tiles 6 is more than max_tiles 4"),
    (lambda top: top.update(num_video_frames=0), "key 'num_video_frames' should be a positive integer, got 0"),
])
def test_unsupported_preprocessing_is_refused_in_one_line(vila15_3b, tmp_path, edit, needle):
    import shutil

    root = tmp_path / "ckpt"
    shutil.copytree(vila15_3b, root)
    top = json.loads((root / "config.json").read_text())
    edit(top)
    (root / "config.json").write_text(json.dumps(top))
    with pytest.raises(CheckpointError, match="config.json") as e:
        load_config(root)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unsupported_projector_and_vision_tower_are_refused(vila15_3b, tmp_path):
    import shutil

    root = tmp_path / "ckpt"
    shutil.copytree(vila15_3b, root)
    pj = root / "mm_projector" / "config.json"
    pj.write_text(json.dumps({**json.loads(pj.read_text()), "mm_projector_type": "mlp_downsample_3x3_s2"}))
    r = cli("info", root)
    assert r.returncode == 2 and "mm_projector_type 'mlp_downsample_3x3_s2' is not supported" in r.stderr
    assert "expected one of linear, mlp2x_gelu, mlp_downsample, mlp_downsample_2x2_fix, mlp_downsample_3x3_fix" \
        in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # a supported type whose weights are another's: the shapes say so, in one line
    pj.write_text(json.dumps({**json.loads(pj.read_text()), "mm_projector_type": "mlp_downsample_3x3_fix"}))
    r = cli("info", root)
    assert r.returncode == 2 and "'layers.1.weight' has shape [4608], expected [10368]" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    pj.write_text(json.dumps({**json.loads(pj.read_text()), "mm_projector_type": "mlp_downsample"}))
    vt = root / "vision_tower" / "config.json"  # VILA1.5-40B's InternViT-6B
    vt.write_text(json.dumps({**json.loads(vt.read_text()), "model_type": "intern_vit_6b"}))
    r = cli("info", root)
    assert r.returncode == 2 and "vision model_type 'intern_vit_6b' is not supported" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("edit, needle", [
    ({"s2_scales": "448,900,1344"}, "s2_scales '448,900,1344' should rise, each a multiple of the first"),
    ({"s2_scales": "384,768,1152"}, "s2_scales start at 384, but the vision tower takes 448-px tiles"),
    ({"s2_scales": 7}, "key 's2_scales' should list the S2 scales"),
    ({"s2_resize_output_to_scale_idx": 0}, "s2_resize_output_to_scale_idx 0 is not supported"),
    ({"s2_max_split_size": 896}, "s2_max_split_size 896 (expected 448, the tile size)"),
    ({"mm_hidden_size": 1152}, "mm_hidden_size 1152, expected 3456 (3 scales x vision hidden 1152)"),
    ({"max_tiles": 6}, "max_tiles 6 is below the 9 tiles of the last S2 scale 1344"),
])
def test_nvila_8b_s2_fields_are_checked_in_one_line(tmp_path, edit, needle):
    """NVILA-8B's dynamic_s2 fields outside what edge_vila.s2 models are refused before any weight is read."""
    from edge_vila.replicas import make_replica

    assert get_layout("NVILA-8B").supported
    root = make_replica(tmp_path / "NVILA-8B", "NVILA-8B", weights=False)
    top = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**top, **edit}))
    with pytest.raises(CheckpointError, match="config.json") as e:
        load_config(root)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.heavy
def test_vila15_3b_replica_info_quantize_export_run(vila15_3b, tmp_path, photo):
    """The path a user takes with the released VILA1.5-3b folder: info -> quantize --method rtn
    -> export -> run on a real photo in ONNX Runtime and on the torch reference."""
    import edge_vila
    from edge_vila.export.report import PROMPTS, logit_agreement

    r = cli("info", vila15_3b)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["tokens_per_image"] == 196 and info["chat_template"] == "vicuna_v1"
    q, b = tmp_path / "q", tmp_path / "b"
    r = cli("quantize", vila15_3b, "--out", q, "--method", "rtn", "--vision-int8", "percentile", "--int8-images", "8",
            "--no-eval")
    assert r.returncode == 0, r.stderr
    report = json.loads((q / "quant_report.json").read_text())
    assert report["calibration"] is None  # RTN computed no calibration activations
    r = cli("export", q, "--out", b, "--max-context", "512", "--no-report")
    assert r.returncode == 0, r.stderr
    man = json.loads((b / "manifest.json").read_text())
    assert man["tokens_per_image"] == 196 and man["template"]["name"] == "vicuna_v1"
    assert man["quant"]["llm"] == "awq-w4" and man["quant"]["vision"] == "int8"
    assert (b / "tokenizer.json").is_file()  # converted from tokenizer.model, so the device needs no sentencepiece
    for path, backend in ((b, "onnxruntime"), (q, "torch")):
        r = cli("run", path, "--backend", backend, "--image", photo, "--prompt", "Describe the image.",
                "--max-new-tokens", "4")
        assert r.returncode == 0, (backend, r.stderr)

    ref = edge_vila.load(q, max_context=512)
    bundle = edge_vila.load(b, exact=True, variant="bundle")
    text = logit_agreement(ref, bundle, PROMPTS[:3], [], steps=8)
    assert text["max_rel_logit_err"] <= 1e-3 and text["greedy_agreement"] == 1.0, text
    # INT8 ViT: ONNX Runtime's Q/DQ and the torch fake-quant reference round a few activations
    # differently at this width (image embeddings agree to cosine ~0.9996), so image prompts are
    # held to a looser bound here and to the exact one with the float ViT below.
    img = logit_agreement(ref, bundle, PROMPTS[:2], [photo], steps=8)
    assert img["max_rel_logit_err"] <= 0.05 and img["greedy_agreement"] >= 0.9, img

    # exact mode with images: the INT4 LLM with the float ViT
    res = _float_vit_agreement(q, tmp_path, PROMPTS[:2], [photo], 512, steps=8)
    assert res["max_rel_logit_err"] <= 1e-3 and res["greedy_agreement"] == 1.0, res


def _float_vit_agreement(q, tmp_path, prompts, images, ctx: int, steps: int) -> dict:
    """The quantized checkpoint without its INT8 ViT table, exported with the float ViT, against
    its torch reference (ORT's exact accuracy level)."""
    import shutil

    import edge_vila
    from edge_vila.export.bundle import ExportOptions, export_bundle
    from edge_vila.export.report import logit_agreement
    from edge_vila.modeling.int8 import INT8_FILE

    qf = tmp_path / "q-float-vit"  # links, not copies: a full-width checkpoint is GBs
    shutil.copytree(q, qf, ignore=shutil.ignore_patterns(INT8_FILE), copy_function=os.symlink)
    bf = export_bundle(qf, tmp_path / "bf", ExportOptions(vision_quant="fp32", max_context=ctx, report=False))
    return logit_agreement(edge_vila.load(qf, max_context=ctx), edge_vila.load(bf, exact=True, variant="bundle"),
                           prompts, images, steps=steps)


def test_tinychat_v2_unpacking_on_a_hand_built_tensor():
    """llm-awq v2 packing, built word by word from its description (quant/tinychat.py):
    input k = 8a + 2b + c of each 32 goes to position 8b + 4c + a; rows 4n'..4n'+3 over 64
    positions are read row-major in runs of four, run t -> word 64j + t, first value lowest."""
    from edge_vila.quant.tinychat import unpack_qweight
    from edge_vila.quant.tinychat import pack_qweight as pack_tinychat_qweight

    n, k = 8, 128
    codes = ((np.arange(n)[:, None] * 7 + np.arange(k)[None, :] * 3) % 16).astype(np.uint8)
    words = np.zeros((n // 4, k), np.int64)
    for row in range(n):
        for col in range(k):
            a, b, c = (col % 32) // 8, (col % 8) // 2, col % 2
            p = (col // 32) * 32 + 8 * b + 4 * c + a
            flat = (row % 4) * 64 + p % 64
            words[row // 4, (p // 64) * 64 + flat // 4] |= int(codes[row, col]) << (4 * (flat % 4))
    hand = words.astype(np.uint16).view(np.int16)
    # word 0 of row-block 0 holds inputs 0, 8, 16, 24 of output row 0; word 16 the same of row 1
    w0 = int(hand[0, 0]) & 0xFFFF
    assert [(w0 >> (4 * i)) & 15 for i in range(4)] == [codes[0, 0], codes[0, 8], codes[0, 16], codes[0, 24]]
    w16 = int(hand[0, 16]) & 0xFFFF
    assert [(w16 >> (4 * i)) & 15 for i in range(4)] == [codes[1, 0], codes[1, 8], codes[1, 16], codes[1, 24]]
    assert np.array_equal(unpack_qweight(hand), codes)
    assert np.array_equal(pack_tinychat_qweight(codes), hand)  # the replica's producer agrees


def test_pickled_code_is_refused_in_one_line(tmp_path):
    import torch

    from edge_vila.quant.tinychat import read_tinychat_state

    path = tmp_path / "evil-awq-v2.pt"
    torch.save({"model.layers.0.mlp.up_proj.qweight": torch.zeros(1), "meta": _Opaque()}, str(path))
    with pytest.raises(CheckpointError, match="refused: the file needs more than weights-only loading") as e:
        read_tinychat_state(path)
    assert "\n" not in str(e.value)


class _Opaque:  # pickled by reference to this module's code: weights_only must refuse it
    pass


@pytest.mark.slow
def test_official_awq_replica_converts_exactly_and_exports(tmp_path, photo):
    import torch

    import edge_vila
    from edge_vila.modeling.llm import load_decoder
    from edge_vila.quant.tinychat import read_tinychat_state
    from edge_vila.replicas import make_awq_replica

    src = make_awq_replica(tmp_path / "VILA1.5-3b-AWQ", "VILA1.5-3b", llm_layers=2, vision_layers=2)
    pt = next((src / "llm").glob("*.pt"))
    assert pt.name == "vila-1.5-3b-w4-g128-awq-v2.pt" and not list((src / "llm").glob("*.safetensors"))
    r = cli("info", src)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["llm"]["quantization"]["version"] == "tinychat-v2"
    r = cli("quantize", src, "--out", tmp_path / "q")
    assert r.returncode == 2 and "already quantized" in r.stderr
    conv = tmp_path / "converted"
    r = cli("convert-awq", src, "--out", conv)
    assert r.returncode == 0, r.stderr

    # by hand: TinyChat's own dequantization, w = q * scales + scaled_zeros, from the .pt
    from edge_vila.quant.tinychat import unpack_qweight

    sd = read_tinychat_state(pt)
    cfg = load_config(conv)
    lm = load_decoder(cfg.llm_dir, cfg.llm)
    base = "model.layers.1.mlp.down_proj"
    q = unpack_qweight(sd[base + ".qweight"].numpy()).astype(np.float32)
    g = np.arange(q.shape[1]) // 128
    w = q * sd[base + ".scales"].float().numpy()[g].T + sd[base + ".scaled_zeros"].float().numpy()[g].T
    ours = lm.get_submodule(base).weight.detach().numpy()
    assert np.abs(ours - w).max() <= 1e-3 * np.abs(w).max()  # fp16 rounding of scaled_zeros only
    hand = load_decoder(cfg.llm_dir, cfg.llm, int4_linears=False)
    for name, mod in hand.named_modules():
        if name.startswith("model.layers.") and name + ".qweight" in sd:
            qq = unpack_qweight(sd[name + ".qweight"].numpy()).astype(np.float32)
            gg = np.arange(qq.shape[1]) // 128
            mod.weight.data = torch.from_numpy(qq * sd[name + ".scales"].float().numpy()[gg].T
                                               + sd[name + ".scaled_zeros"].float().numpy()[gg].T)
    x = torch.randn(1, 6, 2560) * 0.02
    pos = torch.arange(6)
    lm.setup_cache(16)
    hand.setup_cache(16)
    with torch.no_grad():
        a, b = lm(x, pos), hand(x, pos)
    # the only difference: the release stores scaled_zeros = -scales * zero in fp16 (a step of
    # 2^-11 of it); we keep the integer zero point, so logits agree to ~2e-3, greedy exactly
    assert ((a - b).abs().max() / b.abs().max()).item() <= 5e-3
    assert torch.equal(a.argmax(-1), b.argmax(-1))

    bundle = tmp_path / "bundle"
    r = cli("export", src, "--out", bundle, "--vision-quant", "fp32", "--max-context", "512", "--no-report")
    assert r.returncode == 0, r.stderr
    man = json.loads((bundle / "manifest.json").read_text())
    assert man["quant"]["llm"] == "awq-w4" and man["tokens_per_image"] == 196
    # the release's 16-bit embedding table goes to the bundle as fp16, value for value
    from safetensors.numpy import load_file

    from edge_vila.modeling.weights import CheckpointWeights

    table = load_file(str(bundle / "embed.safetensors"))["embed_tokens"]
    src_table = CheckpointWeights(conv / "llm").get("model.embed_tokens.weight")
    assert src_table.dtype in (torch.float16, torch.bfloat16)
    assert table.dtype == np.float16 and np.array_equal(table.astype(np.float32), src_table.float().numpy())
    r = cli("run", bundle, "--image", photo, "--prompt", "Describe the image.", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    res = edge_vila.load(bundle, exact=True, variant="bundle")
    assert res.cfg.tokens_per_image == 196


def _info_quantize_export(ckpt, tmp_path, ctx: int):
    """The user's path through the CLI: info, quantize --method rtn (INT8 ViT on 4 images), export.
    Returns (info JSON, quantized folder, bundle folder, manifest)."""
    r = cli("info", ckpt)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    q, b = tmp_path / "q", tmp_path / "b"
    r = cli("quantize", ckpt, "--out", q, "--method", "rtn", "--vision-int8", "percentile", "--int8-images", "4",
            "--no-eval")
    assert r.returncode == 0, r.stderr
    r = cli("export", q, "--out", b, "--max-context", str(ctx), "--no-report")
    assert r.returncode == 0, r.stderr
    return info, q, b, json.loads((b / "manifest.json").read_text())


# ---- NVILA-Lite-2B: Qwen2 + SigLIP-448 + 3x3 projector + dynamic tiling ------------------
@pytest.fixture(scope="module")
def nvila_lite(tmp_path_factory):
    from edge_vila.replicas import make_replica

    return make_replica(tmp_path_factory.mktemp("rel") / "NVILA-Lite-2B", "NVILA-Lite-2B", llm_layers=2,
                        vision_layers=3)


def test_nvila_lite_replica_config_tokens_and_layout(nvila_lite):
    cfg = load_config(nvila_lite)
    assert cfg.llm.family == "qwen2" and cfg.llm.tie_word_embeddings and cfg.llm.hidden_size == 1536
    assert not (nvila_lite / "llm" / "model.safetensors.index.json").exists()  # one shard, as released
    assert cfg.projector.kind == "mlp_downsample_3x3_fix" and cfg.tokens_per_image == 121
    assert (cfg.preprocess.mode, cfg.preprocess.min_tiles, cfg.preprocess.max_tiles) == ("dynamic", 1, 12)
    it = cfg.image_tokens
    assert (it.end_text, it.marker_sep, it.tile_text) == ("\n", "", "\n")
    from edge_vila.jetson.memory import ModelDims

    d = ModelDims.from_layout("NVILA-Lite-2B")  # at most 12 tiles + thumbnail, each 121 + "\n" + "\n"
    assert (d.tokens_per_image, d.inputs_per_image, d.positions_per_image) == (121, 13, 13 * 123)
    assert ModelDims.from_layout("VILA1.5-3b").positions_per_image == 196


def test_nvila_prompt_is_what_vila_builds(nvila_lite):
    """VILA (generate_content, dynamic): a lone image's "<image>" becomes "<image>\\n" once per
    tile, and its BasicImageEncoder appends the embedding of "\\n" after every tile. For a
    2-tile image and "Describe": [tile0 x121] \\n \\n [tile1 x121] \\n then "\\nDescribe" as text."""
    from edge_vila.prompt import ImageKey, TextTokenizer, encode_with_images

    cfg = load_config(nvila_lite)
    tok = TextTokenizer(nvila_lite / "llm")
    nl = tok.encode("\n")
    keys, used = encode_with_images(tok, "<image>Describe", [["a", "b"]], 121, layout=cfg.image_tokens, tiled=True)
    want = [ImageKey("a", j) for j in range(121)] + nl + nl + [ImageKey("b", j) for j in range(121)] + nl + \
        tok.encode("\nDescribe")
    assert used == 1 and keys == want
    # two images in one message are each resized whole: no rewrite, only the end newline
    keys, used = encode_with_images(tok, "<image><image>Hi", ["a", "b"], 121, layout=cfg.image_tokens)
    assert used == 2 and keys == [ImageKey("a", j) for j in range(121)] + nl + \
        [ImageKey("b", j) for j in range(121)] + nl + tok.encode("Hi")


@pytest.mark.slow
@pytest.mark.heavy
def test_nvila_lite_replica_info_quantize_export_run(nvila_lite, tmp_path, photo):
    """info -> quantize --method rtn -> export -> run (ONNX Runtime and torch) on NVILA-Lite-2B's
    layout; the bundle agrees with the torch reference on text and on a tiled photo."""
    from PIL import Image

    import edge_vila
    from edge_vila.export.report import PROMPTS, logit_agreement

    info, q, b, man = _info_quantize_export(nvila_lite, tmp_path, 2048)
    assert info["tokens_per_image"] == 121 and info["preprocess"]["mode"] == "dynamic"
    assert man["tokens_per_image"] == 121 and man["template"]["name"] == "chatml"
    assert man["template"]["system"] == "You are a helpful assistant"  # VILA's qwen2.jinja, no full stop
    assert man["image_tokens"] == {"per_tile": 121, "end_text": "\n", "marker_sep": "", "tile_text": "\n"}
    assert (man["preprocess"]["mode"], man["preprocess"]["max_tiles"]) == ("dynamic", 12)
    r = cli("budget", b, "--board", "orin-nano-8gb")
    assert r.returncode == 0, r.stderr
    for path, backend in ((b, "onnxruntime"), (q, "torch")):
        r = cli("run", path, "--backend", backend, "--image", photo, "--prompt", "Describe the image.",
                "--max-new-tokens", "4")
        assert r.returncode == 0, (backend, r.stderr)

    wide = Image.open(photo).convert("RGB").resize((600, 300))  # 2:1 -> a 2x1 grid + thumbnail
    ref = edge_vila.load(q, max_context=2048)
    keys, hashes, _ = ref.chat().prompt_keys("Describe.", [wide])
    assert len(hashes) == 3 and sum(not isinstance(k, int) for k in keys) == 3 * 121
    bundle = edge_vila.load(b, exact=True, variant="bundle")
    text = logit_agreement(ref, bundle, PROMPTS[:2], [], steps=6)
    assert text["max_rel_logit_err"] <= 1e-3 and text["greedy_agreement"] == 1.0, text
    img = logit_agreement(ref, bundle, PROMPTS[:1], [wide], steps=6)  # INT8 ViT: the looser bound, as for 3B
    assert img["max_rel_logit_err"] <= 0.05 and img["greedy_agreement"] >= 0.8, img
    res = _float_vit_agreement(q, tmp_path, PROMPTS[:1], [wide], 2048, steps=6)
    assert res["max_rel_logit_err"] <= 1e-3 and res["greedy_agreement"] == 1.0, res


def test_max_tiles_caps_nvila_lite_tiling(nvila_lite):
    """load(max_tiles=2): a 2:1 image that would take 4x2 tiles + thumbnail takes 2x1 + thumbnail."""
    import numpy as np

    import edge_vila
    from edge_vila.errors import InputError

    pipe = edge_vila.load(nvila_lite, max_context=1024, max_tiles=2)
    assert pipe.cfg.preprocess.max_tiles == 2
    img = np.random.default_rng(0).integers(0, 256, (1000, 2000, 3), dtype=np.uint8)  # 2000x1000
    keys, hashes, _ = pipe.chat().prompt_keys("Describe.", [img])
    assert len(hashes) == 3 and sum(not isinstance(k, int) for k in keys) == 3 * 121
    with pytest.raises(InputError, match="max_tiles must be an integer >= 1, got 0"):  # RuntimeOptions' check
        edge_vila.load(nvila_lite, max_context=1024, max_tiles=0)


# ---- NVILA-8B: Qwen2-7B + SigLIP-448 + dynamic_s2 (448/896/1344) + 2x2 projector -------------
@pytest.fixture(scope="module")
def nvila_8b(tmp_path_factory):
    from edge_vila.replicas import make_replica

    return make_replica(tmp_path_factory.mktemp("rel") / "NVILA-8B", "NVILA-8B", llm_layers=2, vision_layers=3)


@pytest.mark.slow
@pytest.mark.heavy
def test_nvila_8b_replica_info_quantize_export_run(nvila_8b, tmp_path, photo):
    """info -> quantize --method rtn -> export -> run on NVILA-8B's layout: a two-graph bundle
    (INT8 ViT, float projector) whose host-side S2 merge agrees with the torch reference on
    text (exact mode) and on an S2-tiled photo; the float vision graphs give the torch
    reference's image tokens to float rounding."""
    import onnx
    from PIL import Image

    import edge_vila
    from edge_vila.export.report import PROMPTS, logit_agreement
    from edge_vila.jetson import engines as E

    from edge_vila.prompt import ImageKey, TextTokenizer

    cfg = load_config(nvila_8b)  # as released: mlp_downsample over 3 x 1152 channels, 256 tokens per block
    assert cfg.llm.family == "qwen2" and not cfg.llm.tie_word_embeddings and cfg.llm.hidden_size == 3584
    assert (cfg.projector.kind, cfg.projector.in_dim, cfg.tokens_per_image) == ("mlp_downsample", 3456, 256)
    pre = cfg.preprocess
    assert (pre.mode, pre.s2_scales, pre.min_tiles, pre.max_tiles) == ("dynamic_s2", [448, 896, 1344], 9, 12)
    assert pre.max_inputs_per_image == 17 and cfg.image_tokens.max_positions(pre) == 12 * 256 + 1
    it = cfg.image_tokens
    assert (it.end_text, it.marker_sep, it.tile_text) == ("\n", "", "")
    info, q, b, man = _info_quantize_export(nvila_8b, tmp_path, 4096)
    assert info["tokens_per_image"] == 256 and info["preprocess"]["mode"] == "dynamic_s2"
    assert {"vision.onnx", "projector.onnx"} <= set(man["files"]) and man["quant"]["vision"] == "int8"
    assert man["io"]["vision"]["outputs"] == ["image_features"] and man["io"]["projector"]["inputs"] == ["image_features"]
    assert man["image_tokens"] == {"per_tile": 256, "end_text": "\n", "marker_sep": "", "tile_text": ""}
    assert (man["preprocess"]["mode"], man["preprocess"]["s2_scales"]) == ("dynamic_s2", [448, 896, 1344])
    r = cli("budget", b, "--board", "agx-orin-64gb")
    assert r.returncode == 0, r.stderr
    # the TensorRT profiles (built on the device; their shapes checked here against the graphs)
    schema = read_manifest(b, verify=False)  # what the TensorRT builder reads
    assert E.vision_batch(schema, 1) == 17
    graph_in = onnx.load(str(b / "projector.onnx"), load_external_data=False).graph.input
    assert [i.name for i in graph_in] == ["image_features"]
    assert [d.dim_value for d in graph_in[0].type.tensor_type.shape.dim][1:] == [1024, 3456]
    assert E.projector_profile(schema, max_images=1).shapes["image_features"] == \
        ((1, 1024, 3456), (12, 1024, 3456), (12, 1024, 3456))
    r = cli("run", b, "--image", photo, "--prompt", "Describe the image.", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr

    ref = edge_vila.load(q, max_context=4096)
    # a lone image is one marker: its blocks' merged map, then "\n" (no per-tile rewrite)
    tok = TextTokenizer(nvila_8b / "llm")
    keys, hashes, msg = ref.chat().prompt_keys("Describe.", [photo])  # 512x512: 3x3 blocks
    assert len(hashes) == 1 and msg == "<image>Describe."
    at = keys.index(ImageKey(hashes[0], 0))
    assert keys[at:at + 2304] == [ImageKey(hashes[0], j) for j in range(2304)]
    assert keys[at + 2304:at + 2306] == tok.encode("\n") + tok.encode("Describe.")[:1]
    keys, hashes, _ = ref.chat().prompt_keys("Compare.", [photo, photo])  # two images: untiled, 256 + "\n" each
    assert len(hashes) == 2 and sum(isinstance(k, ImageKey) for k in keys) == 2 * 256
    wide = Image.open(photo).convert("RGB").resize((600, 300))  # 2:1 -> 2x5 blocks, 1 + 4 + 10 tiles
    keys, hashes, _ = ref.chat().prompt_keys("Describe.", [wide])
    assert len(hashes) == 1 and sum(not isinstance(k, int) for k in keys) == 10 * 256
    bundle = edge_vila.load(b, exact=True, variant="bundle")
    text = logit_agreement(ref, bundle, PROMPTS[:2], [], steps=4)
    assert text["max_rel_logit_err"] <= 1e-3 and text["greedy_agreement"] == 1.0, text
    img = logit_agreement(ref, bundle, PROMPTS[:1], [wide], steps=4)  # INT8 ViT: the looser bound, as for 3B
    assert img["max_rel_logit_err"] <= 0.05 and img["greedy_agreement"] >= 0.75, img
    del ref, bundle
    _s2_float_vision_parity(nvila_8b, tmp_path / "fv", wide)


class _Stages:
    """The two vision stages of one runtime, as edge_vila.s2.encode calls them."""

    def __init__(self, vision, project, hidden_size: int):
        self.encode_images, self.project, self.hidden_size = vision, project, hidden_size


def _s2_float_vision_parity(ckpt, folder, image) -> None:
    """vision.onnx + projector.onnx exported with the float ViT, run in ONNX Runtime, against
    the torch modules they were exported from, through the same host-side S2 merge."""
    import onnxruntime as ort
    import torch

    from edge_vila import s2
    from edge_vila.export.bundle import ExportOptions, _write_vision
    from edge_vila.modeling.projector import load_projector
    from edge_vila.modeling.vision import load_vision_tower
    from edge_vila.modeling.vlm import image_encoder

    cfg = load_config(ckpt)
    folder.mkdir()
    _write_vision(cfg, ckpt, folder / "vision.onnx", ExportOptions(vision_quant="fp32"))
    vit = ort.InferenceSession(str(folder / "vision.onnx"), providers=["CPUExecutionProvider"])
    proj = ort.InferenceSession(str(folder / "projector.onnx"), providers=["CPUExecutionProvider"])
    onnx_stages = _Stages(lambda x: vit.run(None, {"pixels": x})[0],
                          lambda f: proj.run(None, {"image_features": f.astype(np.float32)})[0], cfg.llm.hidden_size)
    pj = load_projector(cfg.projector_dir, cfg.projector)
    enc = image_encoder(cfg, load_vision_tower(cfg), pj).eval()
    with torch.no_grad():
        torch_stages = _Stages(lambda x: enc(torch.from_numpy(x)).numpy(),
                               lambda f: pj(torch.from_numpy(np.ascontiguousarray(f, np.float32))).numpy(),
                               cfg.llm.hidden_size)
        (pixels, grid), = s2.message_inputs([image], cfg.preprocess)
        want = s2.encode(torch_stages, pixels, grid, cfg.preprocess.s2_scales)
    got = s2.encode(onnx_stages, pixels, grid, cfg.preprocess.s2_scales)
    assert got.shape == want.shape == (10 * 256, 3584)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-4, rel
