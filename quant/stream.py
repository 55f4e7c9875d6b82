"""Layer-at-a-time quantization work for models of any size: RTN's packed state is made
tensor by tensor from the checkpoint (it needs no activations); AWQ loads, searches and
packs one decoder layer at a time, carrying the calibration activations from layer to
layer; the quality check (held-out perplexity, float vs each method, per-layer error)
runs the models side by side one decoder layer at a time. Peak memory: one float32 layer, the
packed output, and the held-out hidden states — never a whole-model float copy."""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from edge_vila.progress import tqdm

from edge_vila.config import LLMSpec
from edge_vila.fsutil import atomic_write_json
from edge_vila.modeling.llm import DecoderLayer, RMSNorm, rope_tables
from edge_vila.modeling.weights import CheckpointWeights, SafetensorsWriter
from edge_vila.quantfmt import pack_linear

from .awq import LINEARS, AwqSettings, LayerRunner, apply_awq_layer, search_layer
from .rtn import QuantConfig, fake_quant, quantize

log = logging.getLogger(__name__)

SHARD_BYTES = 2 * 1024 ** 3
# what a streamed evaluation may spend, in multiply-adds per model (float and RTN each):
# 30k tokens of a 135M model, ~1.5k of a 3B one — minutes on a 2-core CPU either way
EVAL_BUDGET_MACS = 4e12


def auto_eval_tokens(spec: LLMSpec, requested: int) -> int:
    n = int(min(requested, max(1024, EVAL_BUDGET_MACS / max(spec.num_params, 1))))
    return n


def _linear_names(spec: LLMSpec, lm_head: bool) -> set[str]:
    out = {f"model.layers.{i}.{n}" for i in range(spec.num_layers) for n in LINEARS}
    return out | ({"lm_head"} if lm_head else set())


def packed(base: str, w: torch.Tensor, q: QuantConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Linear `base`'s float weight [out, in] quantized and packed as AutoAWQ GEMM tensors."""
    codes, s, z = quantize(w.float(), q)
    for suffix, arr in pack_linear(codes.numpy(), s.numpy(), z.numpy()).items():
        yield f"{base}.{suffix}", torch.from_numpy(arr)


def rtn_state(w: CheckpointWeights, spec: LLMSpec, q: QuantConfig, lm_head: bool = False,
              progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the RTN-quantized LLM: decoder linears (and the head, if asked) as
    AutoAWQ GEMM tensors, every other tensor as stored (bf16 stays bf16)."""
    lins = _linear_names(spec, lm_head)
    names = [n for n in w.names if not (spec.tie_word_embeddings and n == "lm_head.weight")
             and "rotary_emb" not in n]
    if lm_head and spec.tie_word_embeddings:
        names.append("lm_head.weight")  # the head is the embedding table: quantize a copy of it
    for name in tqdm(names, desc="RTN", unit="tensor", disable=not progress):
        base = name.removesuffix(".weight")
        if base in lins and name.endswith(".weight"):
            src = "model.embed_tokens.weight" if name == "lm_head.weight" and spec.tie_word_embeddings else name
            yield from packed(base, w.get(src), q)
        else:
            yield name, w.get(name).contiguous()


def write_shards(items: Iterator[tuple[str, torch.Tensor]], folder: Path, metadata: dict) -> list[Path]:
    """Safetensors shards of at most SHARD_BYTES, named as transformers names them, with
    model.safetensors.index.json when there is more than one. Each tensor goes to disk as
    it arrives (SafetensorsWriter), so only the tensor in hand is held, not the shard."""
    written: list[tuple[Path, list[str]]] = []
    writer: SafetensorsWriter | None = None
    keys: list[str] = []
    try:
        for name, t in items:
            nbytes = t.numel() * t.element_size()
            if writer is not None and keys and writer.nbytes + nbytes > SHARD_BYTES:
                written.append((writer.close(), keys))
                writer, keys = None, []
            if writer is None:
                writer = SafetensorsWriter(folder / f".shard-{len(written):05d}.part", metadata)
            writer.add(name, t)
            keys.append(name)
            del t
        if writer is None:
            writer = SafetensorsWriter(folder / f".shard-{len(written):05d}.part", metadata)
        written.append((writer.close(), keys))
        writer = None
    finally:
        if writer is not None:
            writer.abort()
    total, weight_map, final = len(written), {}, []
    for i, (p, keys) in enumerate(written):
        dst = folder / ("model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors")
        p.replace(dst)
        weight_map.update({k: dst.name for k in keys})
        final.append(dst)
    if total > 1:
        atomic_write_json(folder / "model.safetensors.index.json",
                          {"metadata": {"total_size": sum(f.stat().st_size for f in final)}, "weight_map": weight_map})
    return final


class LayerLoader:
    """Float32 decoder layers built from the checkpoint, one at a time."""

    def __init__(self, w: CheckpointWeights, spec: LLMSpec):
        self.w, self.spec = w, spec

    def layer(self, i: int) -> DecoderLayer:
        with torch.device("meta"):
            layer = DecoderLayer(self.spec)
        prefix = f"model.layers.{i}."
        for name, p in list(layer.named_parameters()):
            head, _, leaf = name.rpartition(".")
            setattr(layer.get_submodule(head), leaf, nn.Parameter(self.w.get(prefix + name).float(), requires_grad=False))
        return layer.eval()

    def norm(self) -> RMSNorm:
        n = RMSNorm(self.spec.hidden_size, self.spec.rms_norm_eps)
        n.weight.data = self.w.get("model.norm.weight").float()
        return n

    def head(self) -> torch.Tensor:
        key = "model.embed_tokens.weight" if self.spec.tie_word_embeddings else "lm_head.weight"
        return self.w.get(key).float()


def fake_quant_layer(layer: DecoderLayer, q: QuantConfig) -> None:
    for name in LINEARS:
        fc = layer.get_submodule(name)
        fc.weight.data = fake_quant(fc.weight.data, q)


@torch.no_grad()
def streamed_quality(w: CheckpointWeights, spec: LLMSpec, ids: torch.Tensor, q: QuantConfig,
                     variants: dict[str, Callable[[DecoderLayer, int], None]], lm_head: bool = False,
                     seq_len: int = 512, progress: bool = True, device: torch.device | str = "cpu") -> dict:
    """Held-out perplexity of the float model and of each variant (a function that turns
    float layer i into the quantized one, in place), and each variant's per-layer relative
    output error (fed the float model's input to that layer, on the first block), computed
    one decoder layer at a time."""
    blocks = [ids[i:i + seq_len] for i in range(0, len(ids) - 1, seq_len)]
    full = [b for b in blocks if len(b) == seq_len]
    x = torch.stack(full) if full else blocks[0][None]
    h = {"float": w.get("model.embed_tokens.weight")[x].float().to(device)}
    for v in variants:
        h[v] = h["float"].clone()
    T = x.shape[1]
    cos, sin = rope_tables(spec, T)
    cos, sin = cos[None, None].to(device), sin[None, None].to(device)
    pos = torch.arange(T, device=device)
    x = x.to(device)
    loader = LayerLoader(w, spec)
    errs: dict[str, list[float]] = {v: [] for v in variants}

    def run(layer, hs):
        return torch.cat([layer(hs[i:i + 1], cos, sin, pos, T, None) for i in range(len(hs))])

    for i in tqdm(range(spec.num_layers), desc="quality check (layer by layer)", disable=not progress):
        layer = loader.layer(i).to(device)
        inp = h["float"]
        h["float"] = run(layer, inp)
        base = {k: p.detach().clone() for k, p in layer.state_dict().items()}
        for v, make in variants.items():
            layer.load_state_dict(base)
            make(layer, i)
            y_c, y_ref = run(layer, inp[:1]), h["float"][:1]
            errs[v].append(float(((y_c - y_ref).pow(2).mean() / (y_ref - inp[:1]).pow(2).mean().clamp(min=1e-12)).sqrt()))
            h[v] = run(layer, h[v])
        del layer, base
    norm, head = loader.norm().to(device), loader.head().to(device)
    head_q = fake_quant(head, q) if lm_head else head

    def nll(hs, W):
        return sum(float(F.cross_entropy(F.linear(norm(hs[b, :-1]), W), x[b, 1:], reduction="sum"))
                   for b in range(len(hs)))

    n = x.shape[0] * (T - 1)
    ppl = {"tokens": int(x.numel()), "float": math.exp(nll(h["float"], head) / n)}
    ppl.update({v: math.exp(nll(h[v], head_q) / n) for v in variants})
    return {"perplexity": ppl, "layer_error": errs}


def streamed_rtn_quality(w: CheckpointWeights, spec: LLMSpec, ids: torch.Tensor, q: QuantConfig,
                         lm_head: bool = False, seq_len: int = 512, progress: bool = True,
                         device: torch.device | str = "cpu") -> dict:
    return streamed_quality(w, spec, ids, q, {"rtn": lambda layer, i: fake_quant_layer(layer, q)}, lm_head,
                            seq_len, progress, device)


def awq_state(w: CheckpointWeights, spec: LLMSpec, st: AwqSettings, result: dict[str, torch.Tensor],
              calib: torch.Tensor | None = None, lm_head: bool = False, progress: bool = True,
              device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the AWQ-quantized LLM, one float32 decoder layer in memory at a time.
    With `calib` ([N, T, D] input embeddings) each layer is searched on `device` (the layer
    and the activations carried between layers live there; results come back to the host)
    and `result` filled; without, the saved `result` is applied. Folded norms and linears
    are written in float32."""
    q = st.quant
    for name in w.names:
        if name.startswith("model.layers.") or "rotary_emb" in name:
            continue
        if name == "lm_head.weight" and (spec.tie_word_embeddings or lm_head):
            continue
        yield name, w.get(name).contiguous()
    if lm_head:
        src = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
        yield from packed("lm_head", w.get(src), q)
    loader = LayerLoader(w, spec)
    runner = LayerRunner(None, calib.shape[1], spec, device) if calib is not None else None
    x = calib.to(device) if calib is not None else None
    for i in tqdm(range(spec.num_layers), desc="AWQ search" if calib is not None else "AWQ apply",
                  disable=not progress):
        layer = loader.layer(i)
        if calib is not None:
            layer = layer.to(device)
            x = search_layer(layer, i, runner, x, spec.family, st, result)
            layer = layer.cpu()
            for k in [k for k in result if k.startswith(f"layers.{i}.")]:
                result[k] = result[k].cpu()
        else:
            apply_awq_layer(layer, i, result, q, spec.family)
        for pname, p in layer.named_parameters():
            key = f"model.layers.{i}.{pname}"
            if pname.endswith(".weight") and pname.removesuffix(".weight") in LINEARS:
                yield from packed(key.removesuffix(".weight"), p.data, q)
            else:
                yield key, p.data.contiguous()
        del layer


def embedding_module(w: CheckpointWeights, spec: LLMSpec):
    """What calibration_embeds needs of a model (`.model.embed_tokens`, `.spec`), without the model."""
    from types import SimpleNamespace

    emb = nn.Embedding.from_pretrained(w.get("model.embed_tokens.weight").float(), freeze=True)
    return SimpleNamespace(model=SimpleNamespace(embed_tokens=emb), spec=spec)


def quantization_config(q: QuantConfig, method: str, lm_head: bool) -> dict:
    return {"quant_method": "awq", "bits": q.w_bit, "group_size": q.group_size, "zero_point": q.zero_point,
            "version": "gemm", "modules_to_not_convert": None if lm_head else ["lm_head"],
            "edge_vila_method": method, "edge_vila_lm_head": lm_head}


def llm_config_with(llm_dir: Path, qcfg: dict) -> dict:
    cfg = json.loads((llm_dir / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    return cfg
