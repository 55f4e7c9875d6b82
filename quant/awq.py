"""Activation-aware weight quantization (AWQ, Lin et al. 2024), the search only.

Per decoder layer, on calibration activations:
1. scale search: for each scaling group (prev op -> linears), try s = mean|x|^a for
   a in [0, 1) on an n_grid, normalised by sqrt(max*min); score the inspected block's
   output MSE with the linears fake-quantized as Q(W*s)/s; fold the best s into the
   previous op (RMSNorm weight or Linear rows) and the linears' columns. mean|x| is taken
   over every calibration token; the grid is scored on `score_blocks` evenly spaced
   calibration sequences (whole sequences: attention needs them), which is where the search
   spends its time - a grid point is one forward of the inspected block over what it scores;
2. clip search: per output-channel group, shrink the weight range (skip q/k, whose
   errors are amplified by the softmax) to minimise the linear's output error.
The result (scales + clip maxima) is saved as safetensors and can be re-applied to the
float model any number of times ("search once, apply many").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from edge_vila.progress import tqdm

from edge_vila.modeling.llm import DecoderLM, DecoderLayer, RMSNorm

from .rtn import QuantConfig, fake_quant, pad_to_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScaleGroup:
    prev: str  # op whose output feeds the linears (scales fold into it)
    linears: tuple[str, ...]
    inspect: str  # module whose output error scores a candidate scale
    needs_same_shape: bool = False  # v->o only without GQA (shapes must match to fold)


_LLAMA_LIKE = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", needs_same_shape=True),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
# architecture differences live here, not in isinstance chains
SCALE_GROUPS: dict[str, tuple[ScaleGroup, ...]] = {"llama": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE}
NO_CLIP = ("q_proj", "k_proj")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class AwqSettings:
    quant: QuantConfig = QuantConfig()
    n_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512  # tokens sampled for the clip search
    score_blocks: int = 16  # calibration sequences the scale grid is scored on (0: all)


def score_subset(x: torch.Tensor, n: int) -> torch.Tensor:
    """`n` evenly spaced sequences of x [N, T, D] (all of them when n is 0 or >= N)."""
    if n <= 0 or len(x) <= n:
        return x
    return x[torch.linspace(0, len(x) - 1, n).round().long().to(x.device)]


class LayerRunner:
    """Calls one decoder layer (or its parts) on full calibration sequences, no KV cache."""

    def __init__(self, lm: DecoderLM | None, seq_len: int, spec=None, device: torch.device | str = "cpu"):
        pos = torch.arange(seq_len)
        if lm is not None:
            cos, sin = lm.rope_cos, lm.rope_sin
        else:  # a streamed model: no DecoderLM, the tables from its spec
            from edge_vila.modeling.llm import rope_tables

            cos, sin = rope_tables(spec, seq_len)
        self.cos = cos[pos][None, None].to(device)
        self.sin = sin[pos][None, None].to(device)
        self.pos, self.end = pos.to(device), seq_len

    def attn(self, layer: DecoderLayer, x: torch.Tensor) -> torch.Tensor:
        return layer.self_attn(x, self.cos, self.sin, self.pos, self.end, None)

    def layer(self, layer: DecoderLayer, x: torch.Tensor) -> torch.Tensor:
        return layer(x, self.cos, self.sin, self.pos, self.end, None)

    def inspect(self, layer: DecoderLayer, name: str, x: torch.Tensor) -> torch.Tensor:
        if name == "self_attn":
            return self.attn(layer, x)
        return layer.get_submodule(name)(x)


def _capture_inputs(layer: DecoderLayer, runner: LayerRunner, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    feats: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name in LINEARS:
        mod = layer.get_submodule(name)
        hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: feats.setdefault(n, []).append(i[0].detach())))
    out = torch.cat([runner.layer(layer, x[i:i + 8]) for i in range(0, len(x), 8)])
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in feats.items()}, out


def _batched(fn, x: torch.Tensor, bs: int = 8) -> torch.Tensor:
    return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)])


@torch.no_grad()
def search_scale(layer: DecoderLayer, runner: LayerRunner, g: ScaleGroup, x: torch.Tensor,
                 st: AwqSettings) -> torch.Tensor:
    """Best per-input-channel scale for one group, by the inspected block's output MSE."""
    fcs = [layer.get_submodule(n) for n in g.linears]
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(0)  # every token's statistics
    x = score_subset(x, st.score_blocks)
    fn = (lambda t: runner.inspect(layer, g.inspect, t))
    ref = _batched(fn, x)
    originals = [fc.weight.data.clone() for fc in fcs]
    best, best_s = float("inf"), torch.ones_like(x_mean)
    for r in range(st.n_grid):
        s = x_mean.pow(r / st.n_grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for fc, w in zip(fcs, originals):
            fc.weight.data = fake_quant(w * s, st.quant) / s
        err = float((_batched(fn, x) - ref).float().pow(2).mean())
        if err < best:
            best, best_s = err, s.clone()
    for fc, w in zip(fcs, originals):
        fc.weight.data = w
    return best_s


@torch.no_grad()
def fold_scale(layer: DecoderLayer, g: ScaleGroup, s: torch.Tensor) -> None:
    """prev op output /= s, linears' input columns *= s: the float function is unchanged."""
    prev = layer.get_submodule(g.prev)
    if isinstance(prev, RMSNorm):
        prev.weight.div_(s.to(prev.weight.dtype))
    elif isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype)[:, None])
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:
        raise TypeError(f"cannot fold scales into {type(prev).__name__} ({g.prev})")
    for n in g.linears:
        fc = layer.get_submodule(n)
        fc.weight.mul_(s.to(fc.weight.dtype)[None, :])


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, st: AwqSettings) -> torch.Tensor:
    """Per (output channel, group) max |w| that minimises the group-wise output error.
    Group outputs are batched matmuls over groups: [G, M, g] @ [G, g, out]."""
    gsize = st.quant.groups(w.shape[1])
    x = x.reshape(-1, x.shape[-1])
    if len(x) > st.clip_tokens:
        x = x[torch.linspace(0, len(x) - 1, st.clip_tokens).long()]
    xg = pad_to_groups(x.float(), gsize).reshape(len(x), -1, gsize).transpose(0, 1)  # [G, M, g]
    wp = pad_to_groups(w.float(), gsize)  # padded columns are zero: no output, no range change
    wg = wp.reshape(w.shape[0], -1, gsize)  # [out, G, g]
    ref = torch.bmm(xg, wg.permute(1, 2, 0))  # [G, M, out]
    org_max = wg.abs().amax(-1)  # [out, G]
    best_max, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i in range(int(st.max_shrink * st.n_grid)):
        mx = org_max * (1 - i / st.n_grid)
        cw = wg.clamp(-mx[..., None], mx[..., None]).reshape(w.shape[0], -1)
        q = fake_quant(cw, st.quant).reshape(wg.shape)
        err = (torch.bmm(xg, q.permute(1, 2, 0)) - ref).pow(2).mean(1).t()  # [out, G]
        better = err < best_err
        best_err[better], best_max[better] = err[better], mx[better]
    return best_max


@torch.no_grad()
def apply_clip(fc: nn.Linear, max_val: torch.Tensor, gsize: int) -> None:
    w = fc.weight.data
    m = max_val.to(w.dtype).repeat_interleave(gsize, dim=1)[:, : w.shape[1]]
    fc.weight.data = w.clamp(-m, m)


@torch.no_grad()
def run_awq(lm: DecoderLM, calib: torch.Tensor, st: AwqSettings | None = None,
            progress: bool = True) -> dict[str, torch.Tensor]:
    """Search AWQ scales and clips on `calib` (input embeddings [N, T, D]); the model is
    modified in place (scales folded, weights clipped) and the result is returned."""
    st = st or AwqSettings()
    runner = LayerRunner(lm, calib.shape[1])
    x = calib.to(lm.lm_head.weight.dtype)
    result: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(tqdm(lm.model.layers, desc="AWQ search", disable=not progress)):
        x = search_layer(layer, i, runner, x, lm.spec.family, st, result)
    return result


@torch.no_grad()
def search_layer(layer: DecoderLayer, i: int, runner: LayerRunner, x: torch.Tensor, family: str,
                 st: AwqSettings, result: dict[str, torch.Tensor]) -> torch.Tensor:
    """AWQ on decoder layer `i` (modified in place, its scales and clips added to `result`);
    returns the layer's float output on `x`, the next layer's calibration input."""
    feats, out = _capture_inputs(layer, runner, x)
    for g in SCALE_GROUPS[family]:
        if g.needs_same_shape:
            prev, fc = layer.get_submodule(g.prev), layer.get_submodule(g.linears[0])
            if prev.weight.shape != fc.weight.shape:
                continue
        s = search_scale(layer, runner, g, feats[g.linears[0]], st)
        fold_scale(layer, g, s)
        result[f"layers.{i}.{g.prev}.scale"] = s.float()
        for n in g.linears:  # later searches see the inputs the scaled linears now get
            feats[n] = feats[n] / s.to(feats[n].dtype)
    for n in LINEARS:
        if n.split(".")[-1] in NO_CLIP:
            continue
        fc = layer.get_submodule(n)
        mx = search_clip(fc.weight.data, feats[n], st)
        apply_clip(fc, mx, st.quant.groups(fc.in_features))
        result[f"layers.{i}.{n}.clip"] = mx.float()
    return out  # float outputs are scale-invariant: the next layer sees the original activations


def apply_awq(lm: DecoderLM, result: dict[str, torch.Tensor], quant: QuantConfig) -> None:
    """Re-apply a saved search result to a fresh float model (in place)."""
    for i, layer in enumerate(lm.model.layers):
        apply_awq_layer(layer, i, result, quant, lm.spec.family)


def apply_awq_layer(layer: DecoderLayer, i: int, result: dict[str, torch.Tensor], quant: QuantConfig,
                    family: str) -> None:
    groups = {g.prev: g for g in SCALE_GROUPS[family]}
    prefix = f"layers.{i}."
    dev = next(layer.parameters()).device  # results are kept on the host, the layer may be on a GPU
    mine = {k[len(prefix):]: v.to(dev) for k, v in result.items() if k.startswith(prefix)}
    for rest, val in mine.items():  # scales first: the clips were searched on scaled weights
        if rest.endswith(".scale"):
            fold_scale(layer, groups[rest[: -len(".scale")]], val)
    for rest, val in mine.items():
        if rest.endswith(".clip"):
            fc = layer.get_submodule(rest[: -len(".clip")])
            apply_clip(fc, val, quant.groups(fc.in_features))


def save_awq_result(path: Path, result: dict[str, torch.Tensor], quant: QuantConfig) -> None:
    from edge_vila.fsutil import atomic_write_bytes
    from safetensors.torch import save

    meta = {"w_bit": str(quant.w_bit), "group_size": str(quant.group_size), "zero_point": str(quant.zero_point)}
    atomic_write_bytes(Path(path), save({k: v.contiguous() for k, v in result.items()}, metadata=meta))


def load_awq_result(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


__all__ = ["AwqSettings", "score_subset", "ScaleGroup", "SCALE_GROUPS", "run_awq", "apply_awq", "apply_awq_layer", "search_layer",
           "search_scale", "fold_scale",
           "search_clip", "save_awq_result", "load_awq_result"]
