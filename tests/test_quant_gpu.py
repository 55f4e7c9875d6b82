"""Quantization on CUDA gives what the CPU gives, up to float tolerance: the AWQ search, the
INT8 ViT calibration and the layer-by-layer quality check, each run with --device cuda and
--device cpu on the same checkpoint.

These need a GPU that torch sees (a CUDA build of torch); elsewhere they skip and say why.
Run them, and AWQ on SmolLM2 with timings, with `bash scripts/gpu_check.sh`.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip(f"needs a CUDA GPU that torch sees (torch {torch.__version__}, CUDA build: "
                    f"{torch.version.cuda or 'no'}); run scripts/gpu_check.sh on a machine with one")


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """A tiny VLM quantized (AWQ + INT8 ViT + quality check) on the CPU and on CUDA."""
    _need_cuda()
    from edge_vila.quant.quantize import QuantizeOptions, quantize_checkpoint
    from edge_vila.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("gpuq")
    src = make_tiny_checkpoint(root / "float", llm_hidden=128, intermediate=256, image_size=32)
    reps = {}
    for dev in ("cpu", "cuda"):
        opts = QuantizeOptions(group_size=32, n_text=16, n_mm=8, seq_len=64, eval_tokens=2048, vqa_n=0,
                               int8_images=16, device=dev)
        reps[dev] = quantize_checkpoint(src, root / dev, opts, progress=False)
    return root, reps


def test_awq_search_on_cuda_matches_the_cpu(both):
    from safetensors.torch import load_file

    from edge_vila.modeling.weights import CheckpointWeights

    root, reps = both
    assert reps["cuda"]["device"].startswith("cuda") and reps["cpu"]["device"] == "cpu"
    a, b = load_file(str(root / "cpu" / "awq_result.safetensors")), load_file(str(root / "cuda" / "awq_result.safetensors"))
    assert set(a) == set(b)
    # the grid search takes an argmin: float noise may pick a neighbouring ratio in a few groups
    close = [torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a]
    assert sum(close) >= 0.9 * len(close), f"{len(close) - sum(close)} of {len(close)} searched tensors differ"
    wa, wb = CheckpointWeights(root / "cpu" / "llm"), CheckpointWeights(root / "cuda" / "llm")
    same = [float(np.mean(wa.int4(base)[0] == wb.int4(base)[0])) for base in wa.int4_bases()]
    assert same and min(same) > 0.98, same  # the 4-bit codes themselves


def test_int8_calibration_and_quality_on_cuda_match_the_cpu(both):
    _, reps = both
    va, vb = reps["cpu"]["vision_int8"], reps["cuda"]["vision_int8"]
    for m in va["by_calibrator"]:
        assert abs(va["by_calibrator"][m]["cosine_mean"] - vb["by_calibrator"][m]["cosine_mean"]) < 1e-3, m
    pa, pb = reps["cpu"]["perplexity"], reps["cuda"]["perplexity"]
    for k in ("float", "rtn", "awq"):
        assert abs(pa[k] - pb[k]) / pa[k] < 1e-3, (k, pa[k], pb[k])
    ea, eb = reps["cpu"]["layer_error"], reps["cuda"]["layer_error"]
    assert np.allclose(ea["rtn"], eb["rtn"], rtol=1e-2, atol=1e-5)
    print(json.dumps({"cpu": pa, "cuda": pb}))
