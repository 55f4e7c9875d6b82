"""llm.onnx: inputs_embeds + position_ids + past K/V -> last-position logits + present K/V.

Exported with torch.onnx.export(dynamo=True) over a wrapper that takes and returns flat
tensors, with named dynamic dims. Token embeddings stay outside (embed.safetensors, looked
up on the host) so image embeddings splice in without graph surgery; RoPE cos/sin are
gathered from a table by position inside the graph.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edge_vila.modeling.llm import DecoderLM, rotate_half

log = logging.getLogger(__name__)


class FlatDecoder(nn.Module):
    """Stateless decoder step for export: no cache buffers, past K/V in, present out."""

    def __init__(self, lm: DecoderLM, max_context: int):
        super().__init__()
        self.lm = lm
        self.n_layers = lm.spec.num_layers
        lm.drop_cache()
        lm.set_rope(max_context)
        self.register_buffer("cos_table", lm.rope_cos.clone(), persistent=False)
        self.register_buffer("sin_table", lm.rope_sin.clone(), persistent=False)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
        B, T, _ = inputs_embeds.shape
        P = past[0].shape[2]
        cos = self.cos_table[position_ids][None, None]
        sin = self.sin_table[position_ids][None, None]
        # causal over the new tokens, everything in the past visible
        i = torch.arange(T)[:, None]
        j = torch.arange(P + T)[None, :]
        mask = j <= (i + P)
        h = inputs_embeds
        presents = []
        for li, layer in enumerate(self.lm.model.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(B, T, a.nh, a.hd).transpose(1, 2)
            k = a.k_proj(x).view(B, T, a.nkv, a.hd).transpose(1, 2)
            v = a.v_proj(x).view(B, T, a.nkv, a.hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k = torch.cat([past[2 * li], k], dim=2)
            v = torch.cat([past[2 * li + 1], v], dim=2)
            presents += [k, v]
            # GQA without repeating K/V (which would copy the cache g times per step): the g
            # query heads sharing a KV head are stacked along the query axis instead
            g = a.nh // a.nkv
            qg = q.reshape(B, a.nkv, g * T, a.hd)
            y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask.repeat(g, 1) if g > 1 else mask)
            y = y.reshape(B, a.nh, T, a.hd)
            h = h + a.o_proj(y.transpose(1, 2).reshape(B, T, a.nh * a.hd))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.lm.lm_head(self.lm.model.norm(h[:, -1]))
        return (logits, *presents)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kind}.{i}" for i in range(n_layers) for kind in ("key", "value")]
    present = [f"present_{kind}.{i}" for i in range(n_layers) for kind in ("key", "value")]
    return ["inputs_embeds", "position_ids", *past], ["logits", *present]


def export_llm(lm: DecoderLM, out: Path, max_context: int, opset: int = 21) -> Path:
    """Float llm.onnx (weights quantized later by graph rewriting, see int4.py)."""
    s = lm.spec
    wrapper = FlatDecoder(lm, max_context).eval()
    T, P = 3, 5
    args = (torch.randn(1, T, s.hidden_size), torch.arange(P, P + T),
            *[torch.randn(1, s.num_kv_heads, P, s.head_dim) for _ in range(2 * s.num_layers)])
    ins, outs = io_names(s.num_layers)
    seq = torch.export.Dim("seq_len", min=1, max=max_context)
    past = torch.export.Dim("past_len", min=0, max=max_context)
    shapes = {"inputs_embeds": {1: seq}, "position_ids": {0: seq},
              "past": tuple({2: past} for _ in range(2 * s.num_layers))}
    with torch.no_grad():
        prog = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset, input_names=ins, output_names=outs,
                                 dynamic_shapes=shapes, optimize=True, verbose=False)
    prog.save(str(out), external_data=False)
    return out
