"""Sampling processors (vs transformers'), stop rules and UTF-8-safe streaming."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_vila.errors import InputError
from edge_vila.generate import SamplingParams, apply_repetition_penalty, held_back, sample_token
from edge_vila.prompt import StreamDetokenizer, TextTokenizer


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    seen = np.array([1, 4, 7, 7, 30])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(seen[None]), torch.tensor(logits[None]))[0].numpy()
    np.testing.assert_allclose(apply_repetition_penalty(logits, np.unique(seen), 1.3), ref, rtol=1e-6)


def test_top_k_and_top_p_only_sample_allowed_tokens():
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], np.float32))
    rng = np.random.default_rng(0)
    p = SamplingParams(temperature=1.0, top_k=2)
    got = {sample_token(logits, p, rng) for _ in range(300)}
    ref = TopKLogitsWarper(2)(None, torch.tensor(logits[None]))[0]
    assert got == set(torch.isfinite(ref).nonzero().flatten().tolist()) == {0, 1}
    p = SamplingParams(temperature=1.0, top_p=0.8)
    got = {sample_token(logits, p, rng) for _ in range(500)}
    ref = TopPLogitsWarper(0.8)(None, torch.tensor(logits[None]))[0]
    assert got == set(torch.isfinite(ref).nonzero().flatten().tolist()) == {0, 1, 2}


def test_greedy_and_seeded_sampling_are_deterministic():
    logits = np.random.default_rng(1).normal(size=100).astype(np.float32)
    assert sample_token(logits, SamplingParams(), np.random.default_rng(0)) == int(np.argmax(logits))
    p = SamplingParams(temperature=0.8, seed=5)
    a = [sample_token(logits, p, np.random.default_rng(5)) for _ in range(3)]
    b = [sample_token(logits, p, np.random.default_rng(5)) for _ in range(3)]
    assert a == b


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2),
                                 dict(repetition_penalty=0)])
def test_bad_sampling_params_name_the_field(bad):
    with pytest.raises(InputError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_held_back_keeps_possible_stop_prefixes():
    assert held_back("hello ##", ["###"]) == 2
    assert held_back("hello", ["###"]) == 0
    assert held_back("abc</", ["</s>", "<|x|>"]) == 2


def test_stream_detokenizer_never_splits_utf8(tiny_ckpt):
    tok = TextTokenizer(tiny_ckpt / "llm")
    text = "Grüße 🤖 robots 机器人 see ✓"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    d = StreamDetokenizer(tok)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any(len(p) > 0 for p in pieces[:-1])  # it really streams


def test_stop_string_cuts_output_and_is_not_streamed(tiny_pipe):
    """Force a stop string by asking for one the model will emit: use its own greedy output."""
    full = tiny_pipe.generate("Say something.", max_new_tokens=12)
    assert len(full) > 3
    stop = full[2:4]
    chunks = list(tiny_pipe.stream("Say something.", max_new_tokens=12, stop=(stop,)))
    out = "".join(chunks)
    assert out == full[: full.find(stop)]
    assert tiny_pipe.stats.finish_reason == "stop_string"
