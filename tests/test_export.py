"""Bundles: export, ONNX Runtime vs the torch reference, TensorRT check, bad bundles."""
from __future__ import annotations

import json
import platform
import shutil

import numpy as np
import onnx
import pytest

import edge_vila
from edge_vila.bundle import BundleError
from edge_vila.errors import InputError
from edge_vila.export.bundle import ExportOptions, export_bundle
from edge_vila.export.report import PROMPTS, logit_agreement
from edge_vila.export.trt_check import check_bundle


@pytest.fixture(scope="module")
def qckpt(tmp_path_factory):
    """A tiny VILA checkpoint, AWQ W4 g32 + INT8 ViT (quantized by the export itself)."""
    from edge_vila.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("exp")
    src = make_tiny_checkpoint(root / "float", llm_hidden=128, intermediate=256, image_size=32)
    return src, root


@pytest.fixture(scope="module")
def w4_bundle(qckpt):
    src, root = qckpt
    return export_bundle(src, root / "bundle-w4", ExportOptions(group_size=32, max_context=256, report=False))


@pytest.fixture(scope="module")
def fp_bundle(qckpt):
    src, root = qckpt
    return export_bundle(src, root / "bundle-fp", ExportOptions(llm_quant="fp32", vision_quant="fp32", max_context=256,
                                                                report=False))


def _images(n=3):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(n)]


def test_manifest_without_tiling_fields_reads_as_vila15(w4_bundle, tmp_path):
    """A bundle written before image_tokens / min_tiles / max_tiles existed keeps VILA1.5's rule:
    one vision input per image, its embeddings alone, "<image>\n" written before the text."""
    import shutil

    from edge_vila.bundle import load_bundle_config
    from edge_vila.config import ImageTokens

    old = tmp_path / "old"
    shutil.copytree(w4_bundle, old)
    man = json.loads((old / "manifest.json").read_text())
    assert man["image_tokens"] == {"per_tile": 16, "end_text": "", "marker_sep": "\n", "tile_text": ""}
    del man["image_tokens"]
    for k in ("min_tiles", "max_tiles"):
        del man["preprocess"][k]
    (old / "manifest.json").write_text(json.dumps(man))
    cfg = load_bundle_config(old)
    assert cfg.image_tokens == ImageTokens(per_tile=16) and cfg.preprocess.max_inputs_per_image == 1


def test_bundle_layout_and_manifest(w4_bundle):
    man = json.loads((w4_bundle / "manifest.json").read_text())
    assert {"llm.onnx", "vision.onnx", "embed.safetensors", "tokenizer.json"} <= set(man["files"])
    assert man["quant"]["llm"] == "awq-w4" and man["quant"]["vision"] == "int8"
    assert man["tokens_per_image"] == 16 and man["model"]["max_context"] == 256
    assert man["preprocess"]["height"] == 32 and man["template"]["name"] == "vicuna_v1"
    assert "torch" in man["toolchain"] and "onnxruntime" in man["toolchain"]
    llm = onnx.load(str(w4_bundle / "llm.onnx"))
    dq = [n for n in llm.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 * 7  # every decoder linear
    inits = {i.name: i for i in llm.graph.initializer}
    assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT4 for n in dq)
    assert all(len(n.input) == 2 for n in dq)  # no zero point: symmetric, as TensorRT requires
    vis = onnx.load(str(w4_bundle / "vision.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in vis.graph.node) > 5


def test_trt_check_passes_10_3_and_explains_8_6(w4_bundle, fp_bundle):
    assert check_bundle(w4_bundle, "10.3")["ok"]
    old = check_bundle(w4_bundle, "6.0")  # JetPack 6.0 -> TensorRT 8.6
    assert not old["ok"] and old["target_trt"] == "8.6"
    assert any("INT4 weights need TensorRT >= 10.0" in e for e in old["files"]["llm.onnx"]["errors"])
    assert check_bundle(fp_bundle, "10.3")["ok"]


def test_trt_check_rejects_asymmetric_qdq_and_custom_ops(tmp_path, fp_bundle):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    g = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                           helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
                           helper.make_node("FastGelu", ["d"], ["y"], domain="com.microsoft")], "g", [x], [y],
                          [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
                           helper.make_tensor("z", TensorProto.UINT8, [], [128])])
    b = tmp_path / "b"
    b.mkdir()
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(b / "llm.onnx"))
    errs = check_bundle(b, "10.3")["files"]["llm.onnx"]["errors"]
    assert any("custom domain 'com.microsoft'" in e for e in errs)
    assert any("UINT8/UINT4 are rejected" in e for e in errs)


@pytest.mark.parametrize("which", ["w4", "fp"])
def test_bundle_matches_torch_reference(which, w4_bundle, fp_bundle, qckpt, tmp_path):
    bundle = w4_bundle if which == "w4" else fp_bundle
    src, root = qckpt
    ref_path = root / "float" if which == "fp" else None
    if ref_path is None:  # the quantized checkpoint export made on the way is the reference
        from edge_vila.quant.quantize import QuantizeOptions, quantize_checkpoint

        ref_path = root / "quantized-ref"
        if not ref_path.exists():
            quantize_checkpoint(src, ref_path, QuantizeOptions(group_size=32, eval=False), progress=False)
    ref = edge_vila.load(ref_path, max_context=256)
    # the TensorRT-meant graph itself, and (INT4 bundles) the private fast CPU graph derived from it
    for variant in ("bundle", "fast") if which == "w4" else ("bundle",):
        b = edge_vila.load(bundle, exact=True, variant=variant)
        assert b.backend.name == "onnxruntime" and b.backend.variant == variant
        res = logit_agreement(ref, b, PROMPTS * 4, _images(), steps=10)  # 20 prompts
        assert res["max_rel_logit_err"] <= 1e-3, (variant, res)
        assert res["greedy_agreement"] == 1.0, (variant, res)


@pytest.mark.parametrize("variant", ["fast", "bundle"])
def test_bundle_generation_prefix_reuse_and_eval(w4_bundle, variant):
    from edge_vila.synthetic.eval import eval_shapes_vqa, text_perplexity

    pipe = edge_vila.load(w4_bundle, variant=variant)
    img = _images(1)
    a = pipe.generate("What is this?", images=img, max_new_tokens=6)
    chat = pipe.chat()
    chat.send("What is this?", images=img, max_new_tokens=4)
    chat.send("And now?", max_new_tokens=4)
    assert pipe.stats.reused_tokens > pipe.tokens_per_image  # turn 2 reused turn 1 from the ORT cache
    fresh = edge_vila.load(w4_bundle, variant=variant)
    assert fresh.generate("What is this?", images=img, max_new_tokens=6) == a
    res = eval_shapes_vqa(pipe, 12, progress=False)
    wrong = round((1 - res["accuracy"]) * 12)
    assert set(res["by_objects"]) <= {"1", "2", "3"} and set(res["top_errors"]) <= set(res["per_type"])
    assert 0 < sum(sum(v.values()) for v in res["top_errors"].values()) <= wrong  # a random model errs
    assert text_perplexity(pipe, ["A red circle on the left."])["perplexity"] > 1


def test_bundle_kv_io_is_float16_unless_asked(w4_bundle, qckpt):
    """llm.onnx's past/present K/V are float16 (an Orin's cache size) and the manifest says so;
    `kv_dtype="fp32"` traces them float32. (The float16 graph's agreement with the torch
    reference is test_bundle_matches_torch_reference's bundle variant.)"""
    from edge_vila.export.llm_onnx import trace_graph

    m = onnx.load(str(w4_bundle / "llm.onnx"), load_external_data=False)
    kinds = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.input, *m.graph.output]}
    kv = {k: t for k, t in kinds.items() if k.startswith(("past_", "present_"))}
    assert kv and set(kv.values()) == {onnx.TensorProto.FLOAT16}
    assert kinds["inputs_embeds"] == kinds["logits"] == onnx.TensorProto.FLOAT
    assert json.loads((w4_bundle / "manifest.json").read_text())["io"]["llm"]["kv_dtype"] == "float16"
    spec = edge_vila.config.load_config(qckpt[0]).llm
    g32, _ = trace_graph(spec, 64, kv_dtype="fp32")
    assert {str(v.dtype) for v in g32.graph.inputs if v.name.startswith("past_")} == {"FLOAT"}


def test_checkpoint_and_bundle_files_are_readable_as_the_umask_allows(w4_bundle, qckpt):
    """Nothing the toolchain writes is left at a temp file's 0600 (safetensors' save_file, mkstemp):
    a bundle copied to a robot, or served by a container running as another user, must open."""
    import os
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    want = 0o444 & ~mask
    files = [f for root in (qckpt[0], w4_bundle) for f in root.rglob("*") if f.is_file()]
    assert any(f.name == "kv_scales.safetensors" for f in files) and any(f.suffix == ".safetensors" for f in files)
    unreadable = [str(f) for f in files if stat.S_IMODE(f.stat().st_mode) & want != want]
    assert not unreadable


def test_int8_kv_cache_scales_and_agreement(w4_bundle):
    """The fast graph's INT8 KV cache: each channel's calibrated scale maps the largest value
    seen in calibration to 127/margin (pins the [kv_heads, head_dim] scale layout ORT reads),
    and it decodes like the FP32 cache."""
    # the ViT as export ran it to calibrate (the bundle's S8 graph): image tokens through another
    # form (on x86 without VNNI the default is our Int8Linear, per-token activations) move the
    # calibration's largest values by ~2%, which the scale-layout check below would read as a miss
    fp = edge_vila.load(w4_bundle, variant="fast", kv_cache="fp32", vision_int8="s8")
    q8 = edge_vila.load(w4_bundle, variant="fast", vision_int8="s8")  # KV cache auto: INT8 when not exact
    assert (fp.backend.kv_cache, q8.backend.kv_cache) == ("fp32", "int8")
    assert q8.backend.past[0].numpy().dtype == np.int8
    from edge_vila.backends.native_ops import build_library
    from edge_vila.backends.op_choice import choose, shape_of
    # the defaults are what measured faster on this machine at this model's shapes (recorded once)
    choice = choose(build_library(), shape_of(q8.backend.cfg, 0))
    assert (q8.backend.attention, q8.backend.matmul) == (choice.attention, choice.matmul)
    assert list((w4_bundle / "engines" / "ort-cpu").glob("*-kv8" + ("-edgeattn" if choice.attention == "edge" else "")
                                                          + ("-edgemm" if choice.matmul == "edge" else "")
                                                          + ("-head8" if q8.backend.lm_head == "int8" else "")
                                                          + "/llm_fast.onnx"))
    assert edge_vila.load(w4_bundle, exact=True).backend.kv_cache == "fp32"
    be = q8.backend
    m = be.cfg.llm
    top = np.zeros((len(be.past), m.num_kv_heads, m.head_dim), np.int32)
    from edge_vila.export.kv_scales import calibration_sequences

    for emb in calibration_sequences(be):
        be.reset()
        be.forward(emb, 0)
        for j in range(len(be.past)):
            top[j] = np.maximum(top[j], np.abs(be.cache_view(j)[:, :len(emb)].astype(np.int32)).max(axis=1))
    want = round(127 / 1.25)
    values, keys = top[1::2], top[0::2]
    assert np.abs(values - want).max() <= 1  # every value channel reaches its calibrated range
    half = m.head_dim // 2  # keys: a rotated pair shares one scale, set by the pair's norm
    pair = np.maximum(keys[..., :half], keys[..., half:])
    assert pair.max() <= want + 1 and pair.min() >= want * 0.7
    res = logit_agreement(fp, q8, PROMPTS * 4, _images(), steps=10)
    assert res["greedy_agreement"] >= 0.97 and res["max_rel_logit_err"] <= 0.05, res
    # ORT's GroupQueryAttention over the same INT8 cache (same scales) decodes alike
    gq = edge_vila.load(w4_bundle, attention="gqa", vision_int8="s8")
    assert (gq.backend.attention, gq.backend.kv_cache) == ("gqa", "int8")
    res = logit_agreement(gq, q8, PROMPTS * 4, _images(), steps=10)
    assert res["greedy_agreement"] >= 0.97 and res["max_rel_logit_err"] <= 0.05, res
    # our INT4 linear op (forced, so the portable loops run where VNNI is missing) against MatMulNBits
    mm = edge_vila.load(w4_bundle, matmul="edge", attention="edge")
    nb = edge_vila.load(w4_bundle, matmul="nbits", attention="edge")
    assert (mm.backend.matmul, nb.backend.matmul, nb.backend.attention) == ("edge", "nbits", "edge")
    res = logit_agreement(nb, mm, PROMPTS * 4, _images(), steps=10)
    assert res["greedy_agreement"] >= 0.97 and res["max_rel_logit_err"] <= 0.05, res
    with pytest.raises(edge_vila.errors.InputError, match="matmul='edge' quantizes activations"):
        edge_vila.load(w4_bundle, exact=True, matmul="edge")
    with pytest.raises(edge_vila.errors.InputError, match="matmul"):
        edge_vila.load(w4_bundle, matmul="gemm")
    with pytest.raises(edge_vila.errors.InputError, match="kv_cache"):
        edge_vila.load(w4_bundle, kv_cache="int4")
    with pytest.raises(edge_vila.errors.InputError, match="attention"):
        edge_vila.load(w4_bundle, attention="flash")
    with pytest.raises(edge_vila.errors.InputError, match="INT8 KV cache"):
        edge_vila.load(w4_bundle, kv_cache="fp32", attention="edge")


def test_fast_graph_rounds_a_float_head_to_int8(w4_bundle):
    """The CPU graph's default head: a float head as 8-bit MatMulNBits weights (a quarter of
    fp32's bytes read per token) decodes like the float head; exact keeps it float; asking
    for int8 where no fast graph runs is an error, not a silent float head."""
    from edge_vila.backends.ort_fast import int8_head_supported

    if not int8_head_supported():
        pytest.skip("this onnxruntime has no 8-bit MatMulNBits (1.22+): the head stays float")
    assert json.loads((w4_bundle / "manifest.json").read_text())["io"]["llm"]["head_dtype"] != "int4"
    fl = edge_vila.load(w4_bundle, lm_head="float")
    q8 = edge_vila.load(w4_bundle)
    assert (fl.backend.lm_head, q8.backend.lm_head) == ("float", "int8")
    res = logit_agreement(fl, q8, PROMPTS * 4, _images(), steps=10)
    assert res["greedy_agreement"] >= 0.97 and res["max_rel_logit_err"] <= 0.02, res
    ops = {n.name: n for n in onnx.load(str(q8.backend.fast_graph), load_external_data=False).graph.node}
    assert next(a.i for a in ops["lm_head"].attribute if a.name == "bits") == 8
    assert edge_vila.load(w4_bundle, exact=True).backend.lm_head == "float"
    with pytest.raises(InputError, match="lm_head='int8' rounds"):
        edge_vila.load(w4_bundle, exact=True, lm_head="int8")
    with pytest.raises(InputError, match="INT8 output head needs the fast CPU graph"):
        edge_vila.load(w4_bundle, variant="bundle", lm_head="int8")


def test_quantize_head_int8_is_what_matmulnbits_reads():
    """quantize_head_int8's layout (codes + 128, one scale per 32 input channels, a ragged last
    block zero-padded) is what ORT's 8-bit MatMulNBits computes with: its product equals the
    numpy product of the dequantized weights, and row chunking changes nothing."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from edge_vila.backends.ort_fast import HEAD_BLOCK, int8_head_supported, quantize_head_int8

    def session(B, S, K, N):
        node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=K, N=N, bits=8,
                                block_size=HEAD_BLOCK, accuracy_level=0)
        g = helper.make_graph([node], "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
                              [numpy_helper.from_array(B, "B"), numpy_helper.from_array(S, "S")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        so = ort.SessionOptions()
        so.log_severity_level = 4
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    try:  # the version rule int8_head_supported() reads, held to what this onnxruntime does
        session(np.full((1, 1, HEAD_BLOCK), 129, np.uint8), np.ones(1, np.float32), HEAD_BLOCK, 1)
        runs = True
    except Exception:  # onnxruntime raises its own exception types
        runs = False
    assert int8_head_supported() == runs, ort.__version__
    if not runs:
        pytest.skip(f"onnxruntime {ort.__version__} has no 8-bit MatMulNBits")
    rng = np.random.default_rng(3)
    V, H = 300, 70  # 70 = two whole blocks + a ragged one
    W = (rng.standard_normal((V, H)) * 0.05).astype(np.float16)
    W[5] = 0  # an all-zero row: scale 0, no division by it
    B, sc = quantize_head_int8(W)
    B2, sc2 = quantize_head_int8(W, rows=7)
    assert np.array_equal(B, B2) and np.array_equal(sc, sc2)
    nb = -(-H // HEAD_BLOCK)
    assert B.shape == (V, nb, HEAD_BLOCK) and sc.shape == (V * nb,)
    deq = ((B.astype(np.float32) - 128) * sc.reshape(V, nb, 1)).reshape(V, -1)[:, :H]
    step = np.repeat(sc.reshape(V, nb), HEAD_BLOCK, 1)[:, :H]
    assert np.all(np.abs(deq - W.astype(np.float32)) <= step / 2 + 1e-7)
    x = rng.standard_normal((1, H)).astype(np.float32)
    y = session(B, sc, H, V).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ deq.T, rtol=1e-4, atol=1e-5)


def test_bad_bundles_fail_with_one_line(w4_bundle, tmp_path):
    def copy(name):
        d = tmp_path / name
        shutil.copytree(w4_bundle, d)
        return d

    b = copy("missing")
    (b / "vision.onnx").unlink()
    with pytest.raises(BundleError, match=r"vision.onnx: missing \(listed in manifest.json\)"):
        edge_vila.load(b)
    b = copy("corrupt")
    with open(b / "embed.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="embed.safetensors: sha256 mismatch"):
        edge_vila.load(b)
    b = copy("newer")
    man = json.loads((b / "manifest.json").read_text())
    man["format_version"] = 99
    (b / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match="format_version 99 is newer"):
        edge_vila.load(b)
    with pytest.raises(edge_vila.InputError, match="runs on onnxruntime or tensorrt"):
        edge_vila.load(w4_bundle, backend="torch")


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(colour="red"), "unknown field 'colour'"),
    (lambda m: m["model"].update(num_experts=8), "unknown field 'model.num_experts'"),
    (lambda m: m.pop("template"), "missing field 'template'"),
    (lambda m: m["model"].pop("head_dim"), "missing field 'model.head_dim'"),
    (lambda m: m["model"].update(num_layers="2"), "field 'model.num_layers' is str '2', expected int"),
    (lambda m: m.update(files=["llm.onnx"]), "field 'files' is list"),
    (lambda m: m.update(tokens_per_image=True), "field 'tokens_per_image' is bool"),
])
def test_the_manifest_schema_refuses_what_it_does_not_know(w4_bundle, tmp_path, change, message):
    b = tmp_path / "b"
    shutil.copytree(w4_bundle, b, ignore=shutil.ignore_patterns("engines"))
    man = json.loads((b / "manifest.json").read_text())
    change(man)
    (b / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match=f"manifest.json: {message}"):
        edge_vila.load(b)


def test_the_manifest_schema_and_its_documentation_agree():
    """docs/bundle-format.md's field table names exactly the Manifest's fields (and model.*)."""
    import dataclasses
    import re
    from pathlib import Path

    from edge_vila.bundle import Manifest, ModelInfo, TemplateInfo

    doc = (Path(__file__).resolve().parents[1] / "docs" / "bundle-format.md").read_text()
    table = doc[doc.index("## manifest.json fields"):]
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", table, re.M))
    want = {f.name for f in dataclasses.fields(Manifest)}
    want |= {f"{p}.{f.name}" for p, kind in (("model", ModelInfo), ("template", TemplateInfo))
             for f in dataclasses.fields(kind)}
    assert documented == want, (sorted(want - documented), sorted(documented - want))


def test_fast_cpu_graph_matches_bundle_graph_qwen2(tmp_path):
    """The private CPU graph is derived from the bundle by structure: Qwen2 (q/k/v biases, ties)
    and norm weights the exporter merged (all ones at random init) must still come out exact."""
    from edge_vila.testing import make_tiny_checkpoint

    src = make_tiny_checkpoint(tmp_path / "q2", llm="qwen2", llm_hidden=64, intermediate=128, image_size=32)
    from safetensors.numpy import load_file, save_file

    wf = next((src / "llm").glob("*.safetensors"))
    sd = load_file(str(wf))
    rng = np.random.default_rng(1)
    for k in sd:  # HF initialises biases to zero; real Qwen2 biases are not
        if k.endswith(".bias"):
            sd[k] = rng.normal(0, 0.5, sd[k].shape).astype(sd[k].dtype)
    save_file(sd, str(wf), metadata={"format": "pt"})
    b = export_bundle(src, tmp_path / "b", ExportOptions(group_size=32, max_context=128, report=False))
    ref = edge_vila.load(b, exact=True, variant="bundle")
    fast = edge_vila.load(b, exact=True, variant="fast")
    assert fast.backend.variant == "fast"
    assert list((b / "engines" / "ort-cpu").glob("*/llm_fast.onnx"))  # cached beside the bundle
    res = logit_agreement(ref, fast, PROMPTS * 2, _images(), steps=8)
    assert res["max_rel_logit_err"] <= 1e-4 and res["greedy_agreement"] == 1.0, res
    # the bundle stays the contract: its own files are untouched and still verify
    edge_vila.load(b, variant="bundle")


def test_float_llm_with_int8_vit(qckpt, tmp_path):
    """--llm-quant fp32 --vision-quant int8 on a float checkpoint calibrates the ViT alone."""
    src, _ = qckpt
    b = export_bundle(src, tmp_path / "b", ExportOptions(llm_quant="fp32", vision_quant="int8", max_context=128,
                                                         report=False))
    man = json.loads((b / "manifest.json").read_text())
    assert man["quant"]["llm"] == "fp32" and man["quant"]["vision"] == "int8"
    ops = {n.op_type for n in onnx.load(str(b / "vision.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert "DequantizeLinear" not in {n.op_type for n in onnx.load(str(b / "llm.onnx")).graph.node}


def test_bf16_checkpoint_gets_a_float16_head_with_the_same_logits(qckpt, tmp_path):
    """A bf16 checkpoint's LM head goes to llm.onnx as float16 (half the bytes; exact for
    bf16 values) and Cast to float32 in the graph: the bundle and fast graphs give the
    float32 head's logits (to float rounding). A float32 checkpoint keeps a float32 head."""
    import torch
    from safetensors.torch import load_file, save_file

    from edge_vila.export.report import compare_logits, reference_logits

    src, _ = qckpt
    bf = tmp_path / "bf16"
    shutil.copytree(src, bf)
    for f in (bf / "llm").glob("*.safetensors"):
        save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in load_file(str(f)).items()}, str(f))
    opts = dict(vision_quant="fp32", max_context=128, report=False, quant_method="rtn", group_size=32, max_drop=None)
    b16 = export_bundle(bf, tmp_path / "b16", ExportOptions(**opts))
    b32 = export_bundle(bf, tmp_path / "b32", ExportOptions(head_dtype="fp32", **opts))
    man16 = json.loads((b16 / "manifest.json").read_text())
    assert man16["io"]["llm"]["head_dtype"] == "float16"
    assert json.loads((b32 / "manifest.json").read_text())["io"]["llm"]["head_dtype"] == "float32"
    heads = [i for i in onnx.load(str(b16 / "llm.onnx"), load_external_data=False).graph.initializer
             if "lm_head" in i.name]
    assert [h.data_type for h in heads] == [onnx.TensorProto.FLOAT16]
    V = load_file(str(next((bf / "llm").glob("*.safetensors"))))["lm_head.weight"].shape[0]
    nbytes = lambda b: sum(f.stat().st_size for f in b.glob("llm.onnx*"))
    assert 0 <= nbytes(b32) - nbytes(b16) - 2 * V * 128 < 1024  # the head's half (+ the Cast node)
    for variant in ("bundle", "fast"):
        ref = reference_logits(edge_vila.load(b32, exact=True, variant=variant), PROMPTS[:2], steps=4)
        got = compare_logits(edge_vila.load(b16, exact=True, variant=variant), ref)
        # the same values; ORT may pick another GEMM kernel for the folded graph (~1e-7)
        assert got["max_rel_logit_err"] <= 1e-6 and got["greedy_agreement"] == 1.0, (variant, got)
    f32 = export_bundle(src, tmp_path / "f32", ExportOptions(**opts))  # a float32 checkpoint: no rounding
    assert json.loads((f32 / "manifest.json").read_text())["io"]["llm"]["head_dtype"] == "float32"


def test_a_load_follows_the_recorded_choice(w4_bundle, tmp_path, monkeypatch):
    """The default ops are the recorded (measured) choice of backends/op_choice.py; asked-for ops are kept."""
    from edge_vila.backends import native_ops, op_choice
    from edge_vila.backends.op_choice import OpChoice
    from edge_vila.bundle import load_bundle_config

    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a library (and record) of its own
    lib = native_ops.build_library()
    shape = op_choice.shape_of(load_bundle_config(w4_bundle), 0)
    for matmul, attention in (("nbits", "gqa"), ("edge", "edge"), ("nbits", "edge")):
        rec = {"library_sha256": native_ops.sha256_file(lib), "method": op_choice.METHOD, "onnxruntime": ort.__version__,
               "choices": {shape.key(): OpChoice(matmul, attention, {}, "portable").__dict__}}
        lib.with_name(lib.name + ".choice.json").write_text(json.dumps(rec))
        be = edge_vila.load(w4_bundle).backend
        assert (be.matmul, be.attention, be.kv_cache) == (matmul, attention, "int8")
        assert edge_vila.load(w4_bundle, matmul="edge", attention="edge").backend.matmul == "edge"  # asked: kept


def test_where_gqa_cannot_read_the_int8_cache(w4_bundle, tmp_path, monkeypatch, caplog):
    """On an onnxruntime whose GroupQueryAttention takes no INT8 cache (1.23, as the aarch64 check
    runs; a Jetson's may be older): GQA over it asked for is refused in one line, and without our
    ops (no compiler) the default load keeps an FP32 cache and says why."""
    from edge_vila.backends import native_ops, op_choice

    monkeypatch.setattr(op_choice, "gqa_int8_unsupported", lambda: "onnxruntime 1.23.2: input size 14 not in range")
    with pytest.raises(InputError, match="attention='gqa' over the INT8 KV cache: onnxruntime 1.23.2"):
        edge_vila.load(w4_bundle, attention="gqa")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native_ops, "_compiler", lambda: None)
    be = edge_vila.load(w4_bundle).backend
    assert (be.kv_cache, be.attention) == ("fp32", "gqa")
    assert "FP32 KV cache (GroupQueryAttention cannot read the INT8 one here" in caplog.text
    with pytest.raises(InputError, match="kv_cache='int8': onnxruntime 1.23.2.*cannot be built here"):
        edge_vila.load(w4_bundle, kv_cache="int8")


def test_int8_vision_forms_hold_cosine_on_every_cpu_path(w4_bundle, fp_bundle, monkeypatch):
    """The CPU's INT8 ViT forms (backends/vision_cpu.py) against the float bundle's features:
    U8S8 (this CPU's default with VNNI), U8U8 (the default on x86 without VNNI, where U8S8's int16
    pair sums saturate: derived once, cached with a record, weights dequantizing to the same
    values), our Int8Linear op (edge: 7-bit activations per token; x86 only, where it is the
    default without VNNI) and the bundle's S8 form; auto follows the CPU's flags. On a CPU without
    VNNI the forced U8S8 form is the saturating one (cosine ~0.95 on a Zen 3): it is held below,
    not to 0.999."""
    from edge_vila.backends import vision_cpu

    saturating = vision_cpu.x86_without_vnni()
    imgs = _images(4)

    def feats(pipe):
        hs = [pipe.encode_images([im])[0][0] for im in imgs]
        return np.stack([pipe.image_embeds([h])[h].reshape(-1) for h in hs]).astype(np.float64)

    ref = feats(edge_vila.load(fp_bundle))
    got = {}
    edge = vision_cpu.edge_form_possible()
    for form in ("u8", "u8u8", "s8") + (("edge",) if edge else ()):
        pipe = edge_vila.load(w4_bundle, vision_int8=form)
        assert pipe.backend.vision_int8 == form
        f = feats(pipe)
        got[form] = f
        cos = (f * ref).sum(-1) / np.linalg.norm(f, axis=-1) / np.linalg.norm(ref, axis=-1)
        if form == "u8" and saturating:
            assert cos.min() < 0.999, cos  # what auto's choice of u8u8 avoids here
        else:
            assert cos.min() >= 0.999, (form, cos)
    exact = got["s8"] if saturating else got["u8"]  # the same weights, activations rounded alike
    np.testing.assert_allclose(got["u8u8"], exact, rtol=0, atol=1e-4 * np.abs(exact).max())
    folder = next((w4_bundle / "engines" / "ort-cpu").glob("vision-*-u8u8"))
    assert json.loads((folder / "record.json").read_text())["weights_rewritten"] > 0
    if edge:
        folder = next((w4_bundle / "engines" / "ort-cpu").glob("vision-*-edge"))
        assert json.loads((folder / "record.json").read_text())["weights_rewritten"] > 0
    # auto: edge (u8u8 where it cannot be built) exactly where the CPU has no VNNI (x86), s8 when exact
    monkeypatch.setattr(vision_cpu, "x86_without_vnni", lambda cpuinfo=None: True)
    assert edge_vila.load(w4_bundle).backend.vision_int8 == ("edge" if edge else "u8u8")
    monkeypatch.setattr(vision_cpu, "edge_form_possible", lambda: False)
    assert edge_vila.load(w4_bundle).backend.vision_int8 == "u8u8"
    assert edge_vila.load(w4_bundle, exact=True).backend.vision_int8 == "s8"
    monkeypatch.setattr(vision_cpu, "x86_without_vnni", lambda cpuinfo=None: False)
    assert edge_vila.load(w4_bundle).backend.vision_int8 == "u8"
    (folder / "vision.onnx").write_bytes(b"\0" * 64)  # a damaged cache is rebuilt, never loaded
    pipe = edge_vila.load(w4_bundle, vision_int8="u8u8")
    np.testing.assert_allclose(feats(pipe), got["u8u8"], rtol=0, atol=1e-6 * np.abs(got["u8"]).max())


def test_which_cpus_get_the_u8u8_vision_form():
    from edge_vila.backends.vision_cpu import x86_without_vnni

    if platform.machine() not in ("x86_64", "AMD64"):
        assert not x86_without_vnni("flags : fpu avx2")
        return
    assert x86_without_vnni("processor : 0\nflags : fpu sse4_2 avx avx2 fma\n")            # Zen 3, Haswell..Skylake
    assert not x86_without_vnni("flags : fpu avx2 avx512f avx512bw avx512_vnni\n")         # Cascade Lake+, Zen 4
    assert not x86_without_vnni("flags : fpu avx2 avx_vnni\n")                             # Alder Lake
