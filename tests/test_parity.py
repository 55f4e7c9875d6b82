"""Our static-cache decoder vs transformers, on random tiny Llama and Qwen2 models."""
from __future__ import annotations

import pytest
import torch

from edge_vila.config import LLMSpec
from edge_vila.modeling.llm import DecoderLM

pytestmark = pytest.mark.filterwarnings("ignore")


def _hf_model(family: str, **over):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    kw.update(over)
    torch.manual_seed(0)
    if family == "llama":
        m = LlamaForCausalLM(LlamaConfig(**kw))
    else:
        m = Qwen2ForCausalLM(Qwen2Config(**kw))
    # random init leaves biases at zero; make them matter
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return m.eval()


def _ours(hf) -> DecoderLM:
    spec = LLMSpec.from_hf(hf.config.to_dict(), "hf")
    ours = DecoderLM(spec)
    sd = {k: v for k, v in hf.state_dict().items() if "rotary" not in k}
    if spec.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    ours.load_state_dict(sd, strict=not spec.tie_word_embeddings)
    return ours.eval()


CASES = [("llama", {}), ("qwen2", {}), ("llama", {"tie_word_embeddings": True}),
         ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
         ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}})]


@pytest.mark.parametrize("family,over", CASES, ids=["llama", "qwen2", "tied", "llama3-rope", "linear-rope"])
@torch.inference_mode()
def test_logits_match_transformers_prefill_and_20_decode_steps(family, over):
    hf = _hf_model(family, **over)
    ours = _ours(hf)
    ours.setup_cache(128)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (1, 17), generator=g)
    out = hf(ids, use_cache=True)
    past = out.past_key_values
    emb = hf.get_input_embeddings()
    mine = ours(emb(ids), torch.arange(17))
    assert (mine - out.logits).abs().max() < 1e-4
    pos = 17
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(20):
        out = hf(nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        mine = ours(emb(nxt), torch.tensor([pos]))
        assert (mine - out.logits).abs().max() < 1e-4
        nxt, pos = out.logits[:, -1].argmax(-1, keepdim=True), pos + 1


@torch.inference_mode()
def test_cached_generation_equals_uncached():
    hf = _hf_model("qwen2")
    ours = _ours(hf)
    prompt = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(3))
    emb = ours.model.embed_tokens

    ours.setup_cache(64)
    logits = ours(emb(prompt), torch.arange(9), last_only=True)
    cached = []
    for pos in range(9, 9 + 24):
        t = int(logits[0, -1].argmax())
        cached.append(t)
        logits = ours(emb(torch.tensor([[t]])), torch.tensor([pos]))

    ours.drop_cache()
    seq = prompt[0].tolist()
    uncached = []
    for _ in range(24):
        x = torch.tensor([seq])
        t = int(ours(emb(x), torch.arange(len(seq)))[0, -1].argmax())
        uncached.append(t)
        seq.append(t)
    assert cached == uncached


@torch.inference_mode()
def test_decode_step_writes_one_position_in_place():
    hf = _hf_model("llama")
    ours = _ours(hf)
    ours.setup_cache(32)
    attn = ours.model.layers[0].self_attn
    ptr = attn.k_cache.data_ptr()
    emb = ours.model.embed_tokens
    ours(emb(torch.tensor([[1, 2, 3]])), torch.arange(3))
    before = attn.k_cache.clone()
    ours(emb(torch.tensor([[4]])), torch.tensor([3]))
    assert attn.k_cache.data_ptr() == ptr  # same buffer, never reallocated or concatenated
    changed = (attn.k_cache != before).any(dim=-1).any(dim=1)[0]  # which positions changed
    assert changed.nonzero().flatten().tolist() == [3]
