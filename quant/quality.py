"""Quality measurements for quantized LLMs: perplexity and per-layer output error."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from edge_vila.progress import tqdm

from edge_vila.modeling.llm import DecoderLM

from .awq import LINEARS
from .rtn import QuantConfig, fake_quant


@torch.no_grad()
def perplexity(lm: DecoderLM, ids: torch.Tensor, seq_len: int = 512, progress: bool = False) -> dict:
    """Teacher-forced perplexity over non-overlapping seq_len blocks of a token stream."""
    lm.drop_cache()
    nll, n = 0.0, 0
    blocks = [ids[i:i + seq_len] for i in range(0, len(ids) - 1, seq_len)]
    for blk in tqdm(blocks, desc="perplexity", disable=not progress):
        if len(blk) < 2:
            continue
        logits = lm(lm.model.embed_tokens(blk[None]), torch.arange(len(blk)))[0, :-1]
        nll += float(F.cross_entropy(logits.float(), blk[1:], reduction="sum"))
        n += len(blk) - 1
    return {"perplexity": math.exp(nll / n), "tokens": n}


@torch.no_grad()
def fake_quantize_model(lm: DecoderLM, q: QuantConfig, lm_head: bool = False) -> DecoderLM:
    """A copy whose decoder linears (and optionally the head) hold quantize-dequantized weights."""
    out = copy.deepcopy(lm)
    if lm_head:
        out.lm_head.weight = torch.nn.Parameter(fake_quant(out.lm_head.weight.data.clone(), q))
    for layer in out.model.layers:
        for name in LINEARS:
            fc = layer.get_submodule(name)
            fc.weight.data = fake_quant(fc.weight.data, q)
    return out
