"""Post-training INT8 calibration of the vision tower + projector.

TensorRT's explicit-quantization convention: per-output-channel symmetric INT8 weights,
per-tensor symmetric INT8 activations at the input of every Linear / patch Conv;
LayerNorm, Softmax and GELU stay in float. Activation ranges come from one of three
calibrators: minmax (max |x|), percentile (e.g. 99.99th of |x|) or entropy (TensorRT's
KL-divergence threshold search over a 2048-bin histogram of |x|).

The result is a table of scales; `fake_quant_vision` applies it in torch (the reference
the exported Q/DQ graph is checked against) and `int8_report` measures the damage.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from edge_vila.modeling.int8 import QMAX, Int8Calibration, fake_quant_vision, quantizable  # noqa: F401

log = logging.getLogger(__name__)

CALIBRATORS = ("minmax", "percentile", "entropy")


def weight_scales(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach().float().reshape(m.weight.shape[0], -1)
    return (w.abs().amax(1) / QMAX).clamp(min=1e-8).cpu()


def entropy_threshold(hist: np.ndarray, edges: np.ndarray, n_quant: int = 128) -> float:
    """TensorRT's calibration: the |x| clip threshold whose 128-level quantized histogram
    has the smallest KL divergence from the (clipped) reference histogram."""
    hist = hist.astype(np.float64)
    best_kl, best_i = np.inf, len(hist)
    for i in range(n_quant, len(hist) + 1, 16):
        ref = hist[:i].copy()
        ref[i - 1] += hist[i:].sum()  # outliers fold into the last bin
        # quantize the first i bins into n_quant levels, then expand back over non-empty bins
        chunks = np.array_split(np.arange(i), n_quant)
        cand = np.zeros(i)
        for c in chunks:
            nz = hist[c] > 0
            if nz.any():
                cand[c[nz]] = hist[c].sum() / nz.sum()
        p, q = ref / ref.sum(), cand / max(cand.sum(), 1e-12)
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(edges[best_i])


class _Collector:
    def __init__(self, max_samples: int = 200_000):
        self.max = 0.0
        self.samples: list[np.ndarray] = []
        self.n = 0
        self.max_samples = max_samples

    def __call__(self, x: torch.Tensor) -> None:
        a = x.detach().abs().float().reshape(-1)
        self.max = max(self.max, float(a.max()))
        if self.n < self.max_samples:
            # a bounded random subset, drawn in O(k): a permutation of every activation of a
            # large ViT (millions per call, per layer) was most of the calibration's time
            k = min(len(a), self.max_samples // 8)
            idx = torch.randint(len(a), (k,), generator=torch.Generator().manual_seed(self.n))
            self.samples.append(a[idx.to(a.device)].cpu().numpy())
            self.n += k

    def threshold(self, method: str, percentile: float) -> float:
        s = np.concatenate(self.samples) if self.samples else np.zeros(1)
        if method == "minmax":
            return self.max
        if method == "percentile":
            return float(np.percentile(s, percentile))
        hist, edges = np.histogram(s, bins=2048, range=(0, max(self.max, 1e-8)))
        return entropy_threshold(hist, edges)


@torch.no_grad()
def calibrate_int8(model: nn.Module, batches: list[torch.Tensor], method: str = "percentile",
                   percentile: float = 99.99) -> Int8Calibration:
    """model: pixels -> image embeddings (vision tower + projector)."""
    return calibrate_int8_methods(model, batches, (method,), percentile)[method]


@torch.no_grad()
def calibrate_int8_methods(model: nn.Module, batches: list[torch.Tensor], methods=CALIBRATORS,
                           percentile: float = 99.99, progress: bool = False) -> dict[str, Int8Calibration]:
    """One pass over the calibration images, every requested calibrator's table from it
    (they differ only in how they read the same activation statistics)."""
    from edge_vila.progress import tqdm

    for m in methods:
        if m not in CALIBRATORS:
            raise ValueError(f"calibrator {m!r} unknown (expected one of {CALIBRATORS})")
    mods = quantizable(model)
    dev = next(model.parameters()).device
    cols = {n: _Collector() for n in mods}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: cols[n](inp[0])) for n, m in mods.items()]
    try:
        for b in tqdm(batches, desc="INT8 ViT calibration", unit="batch", disable=not progress):
            model(b.to(dev))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for method in methods:
        cal = Int8Calibration(method)
        for n, m in mods.items():
            if cols[n].n == 0:  # never called (e.g. SigLIP's pooling head, layers after the selected one)
                continue
            cal.act_scale[n] = max(cols[n].threshold(method, percentile), 1e-8) / QMAX
            cal.weight_scale[n] = weight_scales(m)
        out[method] = cal
    return out


@torch.no_grad()
def int8_report(float_model: nn.Module, q_model: nn.Module, pixels: torch.Tensor,
                reference: torch.Tensor | None = None) -> dict:
    """Cosine and relative L2 of the quantized encoder's embeddings against the float one's
    (`reference`: the float embeddings of `pixels`, when already computed)."""
    a = (reference if reference is not None else float_model(pixels)).flatten(1)
    b = q_model(pixels).flatten(1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "rel_l2": float((a - b).norm() / a.norm())}
