"""Prompt building, image splicing, chat turns and KV prefix reuse."""
from __future__ import annotations

import numpy as np
import pytest

from edge_vila.errors import InputError
from edge_vila.prompt import TEMPLATES, ImageKey, encode_with_images, split_images


def test_templates_render_like_vila():
    t = TEMPLATES["vicuna_v1"]
    assert t.render([("<image>\nhi", "Hello.")], system="SYS") + t.user("next") == \
        "SYS USER: <image>\nhi ASSISTANT:Hello.</s>USER: next ASSISTANT:"
    t = TEMPLATES["llama_3"]
    assert t.render([("q", None)], system="S") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    t = TEMPLATES["hermes-2"]
    assert t.render([("q", "a")], system="S") == \
        "<|im_start|>system\nS<|im_end|><|im_start|>user\nq<|im_end|><|im_start|>assistant\na<|im_end|>"
    assert TEMPLATES["plain"].render([("<image>", None)]) == "<image>\n"


def test_image_markers_splice_image_tokens(tiny_pipe):
    assert split_images("a <image> b<image>") == ["a ", None, " b", None]
    keys, used = encode_with_images(tiny_pipe.tokenizer, "x <image> y <image>", ["h1", "h2"], 3)
    img = [k for k in keys if isinstance(k, ImageKey)]
    assert used == 2 and img == [ImageKey("h1", 0), ImageKey("h1", 1), ImageKey("h1", 2),
                                 ImageKey("h2", 0), ImageKey("h2", 1), ImageKey("h2", 2)]
    with pytest.raises(InputError, match="more <image> markers"):
        encode_with_images(tiny_pipe.tokenizer, "<image><image>", ["h1"], 3)


def test_second_turn_prefills_only_new_tokens(tiny_pipe, photo):
    pipe = tiny_pipe
    chat = pipe.chat(system="You are a test.")
    chat.send("What is in this photo?", images=[photo], max_new_tokens=6)
    cached_after_turn1 = len(chat.keys)
    st1 = pipe.stats
    assert st1.prompt_tokens > pipe.tokens_per_image
    before = pipe.backend.tokens_forwarded
    chat.send("And what colour is it?", max_new_tokens=6)
    st2 = pipe.stats
    new_turn = len(pipe.tokenizer.encode(pipe.template.user("And what colour is it?")))
    # turn 2 forwards: its own tokens (+ the closing of turn 1 not yet in the cache), then 1 per decode step
    assert st2.reused_tokens >= cached_after_turn1 - len(pipe.tokenizer.encode(pipe.template.assistant_end)) - 1
    assert st2.prefill_tokens <= new_turn + len(pipe.tokenizer.encode(pipe.template.assistant_end)) + 1
    forwarded = pipe.backend.tokens_forwarded - before
    assert forwarded == st2.prefill_tokens + st2.new_tokens - 1 or forwarded == st2.prefill_tokens + st2.new_tokens
    assert forwarded < st2.prompt_tokens  # nowhere near re-running the conversation


def test_new_frame_recomputes_only_image_and_after(tiny_pipe):
    pipe = tiny_pipe
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (40, 50, 3), dtype=np.uint8) for _ in range(2)]
    pipe.generate("Describe the scene.", images=[frames[0]], max_new_tokens=3)
    pipe.generate("Describe the scene.", images=[frames[1]], max_new_tokens=3)
    st = pipe.stats
    head = len(pipe.chat()._head()) + len(pipe.tokenizer.encode(pipe.template.user_fmt.split("{msg}")[0]))
    # everything before the image is reused; the image tokens and the text after are recomputed
    assert st.reused_tokens == head
    assert st.prefill_tokens == st.prompt_tokens - head


def test_cached_answer_equals_fresh_answer(tiny_ckpt, tiny_pipe, photo):
    """Prefix reuse must not change results: same prompt through a warm and a cold cache."""
    import edge_vila

    warm = tiny_pipe
    warm.generate("Something else first.", images=[photo], max_new_tokens=4)
    a = warm.generate("What is in this photo?", images=[photo], max_new_tokens=10)
    assert warm.stats.reused_tokens > 0
    cold = edge_vila.load(tiny_ckpt, max_context=512)
    b = cold.generate("What is in this photo?", images=[photo], max_new_tokens=10)
    assert cold.stats.reused_tokens == 0
    assert a == b


def test_several_images_and_video_frames(tiny_pipe, photo):
    frames = [np.full((24, 24, 3), v, np.uint8) for v in (0, 80, 160, 240)]
    tiny_pipe.generate("Compare <image> and <image>.", images=[photo, frames[0]], max_new_tokens=2)
    assert tiny_pipe.stats.prompt_tokens > 2 * tiny_pipe.tokens_per_image
    tiny_pipe.generate("What happens in this video?", images=frames, max_new_tokens=2)
    assert tiny_pipe.stats.prompt_tokens > 4 * tiny_pipe.tokens_per_image
    with pytest.raises(InputError, match="2 <image> markers but 1 images"):
        tiny_pipe.generate("<image> vs <image>", images=[photo])
