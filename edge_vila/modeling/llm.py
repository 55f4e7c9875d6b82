"""Llama / Qwen2 decoder with a static, preallocated KV cache (gpt-fast style).

Parameter names match transformers' `LlamaForCausalLM` / `Qwen2ForCausalLM`, so an HF
`llm/` folder's safetensors load directly. The model takes `inputs_embeds` (token
embeddings are looked up outside, so image embeddings splice in freely) and absolute
positions; a forward writes K/V only at those positions and attends over the cache
prefix up to the last one — no concatenation, no copy of the cache.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import LLMSpec, weight_files
from ..errors import CheckpointError


def rope_inv_freq(spec: LLMSpec) -> torch.Tensor:
    """RoPE inverse frequencies, with the 'linear' and 'llama3' scalings (Llama 3.1 paper)."""
    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    sc = spec.rope_scaling
    if not sc:
        return inv
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        return inv / float(sc["factor"])
    # llama3: keep high frequencies, divide low ones by factor, blend in between
    factor, lo, hi = float(sc["factor"]), float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(is_mid, mid, scaled)


def rope_tables(spec: LLMSpec, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_len, head_dim] in float32 (rotate-half layout, as transformers)."""
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32, device="cpu"), rope_inv_freq(spec))
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, s: LLMSpec):
        super().__init__()
        self.nh, self.nkv, self.hd = s.num_heads, s.num_kv_heads, s.head_dim
        self.q_proj = nn.Linear(s.hidden_size, self.nh * self.hd, bias=s.attention_bias)
        self.k_proj = nn.Linear(s.hidden_size, self.nkv * self.hd, bias=s.attention_bias)
        self.v_proj = nn.Linear(s.hidden_size, self.nkv * self.hd, bias=s.attention_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, s.hidden_size, bias=False)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x, cos, sin, pos, end: int, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.k_cache is None:  # no cache: plain causal attention over this chunk (training)
            keys, vals = k, v
        else:
            self.k_cache[:, :, pos] = k.to(self.k_cache.dtype)  # writes exactly T positions
            self.v_cache[:, :, pos] = v.to(self.v_cache.dtype)
            keys, vals = self.k_cache[:, :, :end], self.v_cache[:, :, :end]  # views, not copies
        y = F.scaled_dot_product_attention(q, keys.to(q.dtype), vals.to(q.dtype), attn_mask=mask,
                                           is_causal=self.k_cache is None and T > 1 and mask is None,
                                           enable_gqa=self.nh != self.nkv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, s: LLMSpec):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, s: LLMSpec):
        super().__init__()
        self.self_attn = Attention(s)
        self.mlp = MLP(s)
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)

    def forward(self, x, cos, sin, pos, end, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos, end, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    def __init__(self, s: LLMSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(s) for _ in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)


class DecoderLM(nn.Module):
    def __init__(self, spec: LLMSpec):
        super().__init__()
        self.spec = spec
        self.model = _Body(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.set_rope(min(spec.max_position_embeddings, 4096))
        self.max_context = 0

    def set_rope(self, max_len: int) -> None:
        # plain attributes, not buffers: module.to(bfloat16) must not round the tables
        dev = self.lm_head.weight.device
        cos, sin = rope_tables(self.spec, max_len)
        if dev.type != "meta":
            cos, sin = cos.to(dev), sin.to(dev)
        self.rope_cos, self.rope_sin = cos, sin

    def setup_cache(self, max_context: int, dtype: torch.dtype | None = None, batch: int = 1) -> None:
        """Allocate K/V for `max_context` positions once; generation never reallocates."""
        s = self.spec
        dtype = dtype or self.lm_head.weight.dtype
        dev = self.lm_head.weight.device
        if max_context > self.rope_cos.shape[0]:
            self.set_rope(max_context)
        for layer in self.model.layers:
            shape = (batch, s.num_kv_heads, max_context, s.head_dim)
            layer.self_attn.k_cache = torch.zeros(shape, dtype=dtype, device=dev)
            layer.self_attn.v_cache = torch.zeros(shape, dtype=dtype, device=dev)
        self.max_context = max_context

    def drop_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = None
        self.max_context = 0

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor,
                last_only: bool = False) -> torch.Tensor:
        """inputs_embeds [B,T,D], positions [T] (absolute) -> logits [B,T,V] (or [B,1,V])."""
        h = self.hidden(inputs_embeds, positions)
        return self.lm_head(h[:, -1:] if last_only else h)

    def hidden(self, inputs_embeds: torch.Tensor, positions: torch.Tensor,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B,T,D].

        Training with packed rows (no cache) passes positions [B,T] that restart at each
        sample and a boolean attn_mask [B,1,T,T] (True = may attend)."""
        T = inputs_embeds.shape[1]
        if positions.dim() == 2:  # packed training rows
            if self.max_context:
                raise ValueError("per-row positions are for cache-free (training) forwards")
            cos = self.rope_cos[positions].to(inputs_embeds.dtype)[:, None]
            sin = self.rope_sin[positions].to(inputs_embeds.dtype)[:, None]
            end, mask = T, attn_mask
        else:
            cos = self.rope_cos[positions].to(inputs_embeds.dtype)[None, None]
            sin = self.rope_sin[positions].to(inputs_embeds.dtype)[None, None]
            end = int(positions.max()) + 1 if self.max_context else T
            mask = None
            if self.max_context and T > 1:  # causal by absolute position: key j visible to query at p iff j <= p
                mask = torch.arange(end, device=positions.device)[None, :] <= positions[:, None]
            if self.max_context and end > self.max_context:
                raise ValueError(f"position {end - 1} beyond the allocated cache ({self.max_context})")
        h = inputs_embeds
        for layer in self.model.layers:
            h = layer(h, cos, sin, positions, end, mask)
        return self.model.norm(h)


def load_safetensors_dir(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder in one dict (for small parts: projectors, test fixtures)."""
    from safetensors.torch import load_file

    files = weight_files(Path(folder))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights found")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


class Int4Linear(nn.Module):
    """A linear that keeps AutoAWQ's 4-bit codes (two per byte) and dequantizes at each call:
    the torch reference of a quantized checkpoint computes with exactly the weights the
    bundle holds, in a quarter of float32's memory (a 3B model: 1.4 GB instead of 11)."""

    def __init__(self, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        out_f, in_f = codes.shape
        G = scales.shape[1]
        if G != -(-in_f // group_size):
            raise CheckpointError(f"{G} scale groups do not cover {in_f} inputs in groups of {group_size}")
        self.in_features, self.out_features = in_f, out_f
        self.group_size = g = group_size
        c = np.zeros((out_f, G * g + (G * g) % 2), np.uint8)  # padded to whole groups: no gathers per call
        c[:, :in_f] = codes
        self.register_buffer("packed", torch.from_numpy(np.ascontiguousarray(c[:, 0::2] | (c[:, 1::2] << 4))))
        self.register_buffer("scales", torch.from_numpy(np.ascontiguousarray(scales, np.float32))[..., None])
        self.register_buffer("zeros", torch.from_numpy(np.ascontiguousarray(zeros, np.float32))[..., None])
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    ROWS_PER_CHUNK = 1024  # dequantize this many output rows at a time: bounded temporaries at any width

    def _dequant(self, r0: int, r1: int) -> torch.Tensor:
        p = self.packed[r0:r1]
        G, g = self.scales.shape[1], self.group_size
        q = torch.stack([p & 15, p >> 4], -1).reshape(len(p), -1)[:, : G * g].reshape(len(p), G, g)
        w = (q.float() - self.zeros[r0:r1]) * self.scales[r0:r1]
        return w.reshape(len(p), G * g)[:, : self.in_features]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight [out, in] (a fresh tensor: assigning to it changes nothing)."""
        return self._dequant(0, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for r0 in range(0, self.out_features, self.ROWS_PER_CHUNK):
            r1 = min(r0 + self.ROWS_PER_CHUNK, self.out_features)
            b = None if self.bias is None else self.bias[r0:r1].to(x.dtype)
            outs.append(F.linear(x, self._dequant(r0, r1).to(x.dtype), b))
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)


def load_decoder(folder: Path, spec: LLMSpec, dtype: torch.dtype = torch.float32,
                 int4_linears: bool = True) -> DecoderLM:
    """The decoder of an HF LLM folder, filled tensor by tensor from its memory-mapped
    safetensors (peak memory: the model in `dtype`, plus one tensor). AutoAWQ linears stay
    4-bit (`Int4Linear`) unless int4_linears=False, which makes them float nn.Linear."""
    from .weights import CheckpointWeights

    w = CheckpointWeights(folder)
    if "lm_head.qweight" in w:  # a quantized head is its own tensor, no longer the embedding table
        spec = dataclasses.replace(spec, tie_word_embeddings=False)
    with torch.device("meta"):
        model = DecoderLM(spec)
    model.set_rope(model.rope_cos.shape[0])
    int4 = set(w.int4_bases())
    # the config's group size, not one inferred from the scales' shape: with a short last
    # group (576 inputs, g128: 5 groups) ceil(576 / 5) = 116 would be wrong
    gsize = int((spec.quantization or {}).get("group_size") or 128)
    for base in int4:
        try:
            head, _, leaf = base.rpartition(".")
            parent = model.get_submodule(head)
            old = getattr(parent, leaf)
        except AttributeError:
            raise CheckpointError(f"{folder}: quantized tensor {base}.qweight matches no linear of the config") from None
        codes, s, z = w.int4(base)
        if codes.shape != (old.out_features, old.in_features):
            raise CheckpointError(f"{folder}: {base} is {codes.shape[0]}x{codes.shape[1]}, config.json says "
                                  f"{old.out_features}x{old.in_features}")
        bias = w.get(base + ".bias").float() if base + ".bias" in w else None
        lin = Int4Linear(codes, s, z, gsize, bias)
        if not int4_linears:  # the same dequantized weight, held as a float nn.Linear
            flat = nn.Linear(old.in_features, old.out_features, bias=bias is not None)
            flat.weight.data = lin.weight
            if bias is not None:
                flat.bias.data = bias
            lin = flat
        setattr(parent, leaf, lin)
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = {k for k, p in params.items() if p.is_meta}
    if spec.tie_word_embeddings:
        expected.discard("lm_head.weight")
    done = {b + s for b in int4 for s in (".weight", ".bias")}
    unexpected = [k for k in w.float_names() if k not in expected and k not in done and "rotary_emb" not in k
                  and not (spec.tie_word_embeddings and k == "lm_head.weight")]
    missing = sorted(expected - set(w.float_names()))
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match the config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k in sorted(expected):
        t = w.get(k)
        p = params[k]
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"{folder}: weights do not match config.json ({k}: checkpoint "
                                  f"{tuple(t.shape)}, model {tuple(p.shape)})")
        head, _, leaf = k.rpartition(".")
        setattr(model.get_submodule(head), leaf, nn.Parameter(t.to(dtype), requires_grad=p.requires_grad))
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()  # not .to(dtype): Int4Linear's scales stay float32 in a bf16 model
