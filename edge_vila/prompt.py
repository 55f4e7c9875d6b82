"""Chat templates, tokenizer wrapper, `<image>` splicing and streaming detokenization.

A prompt becomes a list of *keys*: token ids (int >= 0) and, for every image token,
an `ImageKey(image_hash, j)`. Keys are what the KV cache remembers, so a new turn or a
new camera frame reuses every cached position whose key is unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence, Union

from .errors import CheckpointError, InputError

IMAGE_PLACEHOLDER = "<image>"


class ImageKey(NamedTuple):
    image: str  # content hash of the preprocessed pixels
    index: int  # which of the image's tokens


Key = Union[int, ImageKey]


@dataclass(frozen=True)
class ChatTemplate:
    """A conversation format. Rendering is split in pieces so that a chat can append a
    turn's tokens to the cached history instead of re-tokenizing the whole conversation."""
    name: str
    system: str
    system_fmt: str  # text once at the start; "{system}" is replaced
    user_fmt: str  # a user message plus the assistant header; "{msg}" is replaced
    assistant_end: str  # text closing an assistant reply
    stop: tuple[str, ...]
    add_bos: bool
    # where images go when a message has no <image> markers: before the text (VILA's
    # convention) or after it, right before the answer (the tiny recipe's: fixed distances
    # from the answer to every image token make position readout easy for a small LLM)
    image_first: bool = True

    def attach_images(self, msg: str, n: int, sep: str = "\n") -> str:
        """`msg` with n <image> markers, joined by `sep` (NVILA: "", its encoder ends each
        image with a newline itself)."""
        if n == 0 or IMAGE_PLACEHOLDER in msg:
            return msg
        marks = sep.join([IMAGE_PLACEHOLDER] * n)
        return f"{marks}{sep}{msg}" if self.image_first else f"{msg}{sep}{marks}"

    def head(self, system: str | None = None) -> str:
        return self.system_fmt.replace("{system}", self.system if system is None else system)

    def user(self, msg: str) -> str:
        return self.user_fmt.replace("{msg}", msg)

    def render(self, turns: Sequence[tuple[str, str | None]], system: str | None = None) -> str:
        """Whole conversation as text: [(user, assistant-or-None), ...]."""
        out = self.head(system)
        for user, reply in turns:
            out += self.user(user)
            if reply is not None:
                out += reply + self.assistant_end
        return out


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                  "content that the user provides, and assist the user with a variety of tasks using natural language.")

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (
    # VILA's conv_vicuna_v1 (separator style TWO: " " and "</s>")
    ChatTemplate("vicuna_v1", _VICUNA_SYSTEM, "{system} ", "USER: {msg} ASSISTANT:", "</s>", ("</s>",), True),
    # VILA's llama_3 (separator style LLAMA_3)
    ChatTemplate("llama_3", _LLAMA3_SYSTEM,
                 "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
                 "<|start_header_id|>user<|end_header_id|>\n\n{msg}<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n",
                 "<|eot_id|>", ("<|eot_id|>", "<|end_of_text|>"), False),
    # VILA's hermes_2 (separator style MPT: no newline after <|im_end|>)
    ChatTemplate("hermes-2", "Answer the questions.", "<|im_start|>system\n{system}<|im_end|>",
                 "<|im_start|>user\n{msg}<|im_end|><|im_start|>assistant\n", "<|im_end|>", ("<|im_end|>",), False),
    # standard ChatML (Qwen2, SmolLM2): newline after every <|im_end|>
    ChatTemplate("chatml", "You are a helpful assistant.", "<|im_start|>system\n{system}<|im_end|>\n",
                 "<|im_start|>user\n{msg}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n", ("<|im_end|>",), False),
    # VILA's plain (stage-1 alignment): image then caption, no roles
    ChatTemplate("plain", "", "", "{msg}\n", "\n", (), True),
    # the training recipe's own: vicuna's roles without the long system prompt (short sequences)
    ChatTemplate("edge", "", "", "USER: {msg} ASSISTANT:", "</s>", ("</s>",), True, image_first=False),
)}


def get_template(name: str, system: str | None = None) -> ChatTemplate:
    if name not in TEMPLATES:
        raise InputError(f"chat template {name!r} unknown (expected one of {', '.join(TEMPLATES)})")
    t = TEMPLATES[name]
    if system is not None:
        t = dataclasses.replace(t, system=system)
    return t


def guess_template(tokenizer: "TextTokenizer", jinja: str | None) -> ChatTemplate:
    """Pick a template for checkpoints that do not name one (VILA passes conv_mode at run time)."""
    if "<|eot_id|>" in tokenizer.vocab:
        return TEMPLATES["llama_3"]
    if "<|im_start|>" in tokenizer.vocab:
        system = None
        if jinja and (m := re.search(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", jinja, re.S)):
            system = m.group(1)
        return get_template("chatml", system)
    return TEMPLATES["vicuna_v1"]


class TextTokenizer:
    """`tokenizers`-backed tokenizer (no transformers at run time). Special tokens are
    never added implicitly: templates place BOS and markers themselves."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.folder = folder
        tj = folder / "tokenizer.json"
        if tj.is_file():
            try:
                self._tok = Tokenizer.from_file(str(tj))
            except Exception as e:  # tokenizers raises a bare Exception on bad JSON
                raise CheckpointError(f"{tj}: cannot be read as a tokenizer ({e})") from None
        else:
            self._tok = self._convert_slow(folder)
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.vocab: dict[str, int] = self._tok.get_vocab(with_added_tokens=True)
        self.bos_id = self._special_id(cfg.get("bos_token"))
        self.eos_id = self._special_id(cfg.get("eos_token"))
        self.jinja: str | None = cfg.get("chat_template")
        if self.jinja is None and (folder / "chat_template.jinja").is_file():
            self.jinja = (folder / "chat_template.jinja").read_text()
        self.special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._dummy_prefix_space = _prepends_first(self._tok.pre_tokenizer)

    def _special_id(self, tok) -> int | None:
        if isinstance(tok, dict):
            tok = tok.get("content")
        return self.vocab.get(tok) if tok else None

    @staticmethod
    def _convert_slow(folder: Path):
        """Folders with only a sentencepiece model (some VILA1.5 llm/ dirs): convert once
        through transformers if it is installed (the toolchain has it; the device bundle
        always carries tokenizer.json)."""
        import importlib.util

        sentencepiece = (folder / "tokenizer.model").is_file()
        if importlib.util.find_spec("transformers") is None or (
                sentencepiece and importlib.util.find_spec("sentencepiece") is None):
            what = "only a sentencepiece tokenizer.model" if sentencepiece else "no tokenizer.json"
            raise CheckpointError(f"{folder}: {what}; converting it needs transformers and sentencepiece: "
                                  "pip install 'edge-vila[export]'")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
        except Exception as e:
            raise CheckpointError(f"{folder}: no usable tokenizer ({e.__class__.__name__}: {e})") from None
        if not hasattr(tok, "backend_tokenizer"):
            raise CheckpointError(f"{folder}: tokenizer cannot be converted to tokenizer.json")
        return tok.backend_tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if self._dummy_prefix_space and text.startswith(" "):
            # sentencepiece always adds its dummy prefix: " What" is "▁▁What"; the converted
            # tokenizer's Metaspace(prepend_scheme="first") skips it when the text already
            # starts with a space ("▁What"). One more space restores sentencepiece's pieces.
            text = " " + text
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, text: str) -> int | None:
        return self.vocab.get(text)

    def save(self, folder: Path) -> None:
        self._tok.save(str(Path(folder) / "tokenizer.json"))


def _prepends_first(pre) -> bool:
    """Whether a pre-tokenizer is sentencepiece's dummy prefix as transformers converts it
    (Metaspace, prepend_scheme "first"), alone or inside a Sequence (indexable, no len)."""
    from tokenizers import pre_tokenizers

    if isinstance(pre, pre_tokenizers.Metaspace):
        return pre.prepend_scheme == "first"
    return isinstance(pre, pre_tokenizers.Sequence) and any(_prepends_first(p) for p in pre)


def split_images(text: str) -> list[str | None]:
    """'a <image> b' -> ['a ', None, ' b'] (None marks an image slot)."""
    parts: list[str | None] = []
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            parts.append(None)
        if chunk:
            parts.append(chunk)
    return parts


def encode_with_images(tok: TextTokenizer, text: str, images: Sequence[str | Sequence[str]],
                       tokens_per_image: int | Mapping[str, int], start_image: int = 0, layout=None,
                       tiled: bool = False) -> tuple[list[Key], int]:
    """Tokenize text whose `<image>` markers take the next images in order.

    An image is its hash, or the hashes of its vision inputs (tiles, then thumbnail), each
    taking `tokens_per_image` positions (or as many as the mapping gives its hash). With
    `layout` (an ImageTokens), every input's embeddings are followed by end_text's tokens
    (NVILA), and with `tiled` (the message's lone image was cut into tiles) the marker is
    first rewritten as one marker + tile_text per input, as VILA rewrites the prompt.
    Returns the keys and how many images were consumed. Text chunks are tokenized
    separately (as VILA's tokenizer_image_token does) so image tokens never merge with
    neighbouring text.
    """
    inputs = [[i] if isinstance(i, str) else list(i) for i in images]
    end_ids = tok.encode(layout.end_text) if layout is not None and layout.end_text else []
    chunks = split_images(text)
    if tiled and layout is not None and layout.tile_text:
        chunks = _expand_markers(chunks, [len(i) for i in inputs[start_image:]], layout.tile_text)
    keys: list[Key] = []
    used, k = start_image, 0
    for part in chunks:
        if part is not None:
            keys.extend(tok.encode(part))
            continue
        if used >= len(inputs):
            raise InputError(f"prompt has more {IMAGE_PLACEHOLDER} markers than images given ({len(inputs)})")
        h = inputs[used][k]
        n = tokens_per_image if isinstance(tokens_per_image, int) else tokens_per_image[h]
        keys.extend(ImageKey(h, j) for j in range(n))
        keys.extend(end_ids)
        k += 1
        if k == len(inputs[used]):
            used, k = used + 1, 0
    if k:
        raise InputError(f"prompt's {IMAGE_PLACEHOLDER} markers end inside an image's tiles")
    return keys, used - start_image


def _expand_markers(chunks: list[str | None], counts: Sequence[int], text: str) -> list[str | None]:
    r"""Each marker -> (marker, text) x its image's input count, then adjacent texts joined
    (VILA tokenizes the rewritten prompt as one string: the last "\n" meets what follows)."""
    out: list[str | None] = []
    images = iter(counts)
    for part in chunks:
        if part is None:
            for _ in range(next(images, 1)):
                out += [None, text]
        elif out and isinstance(out[-1], str):
            out[-1] += part
        else:
            out.append(part)
    return out


class StreamDetokenizer:
    """Turns a growing token list into text deltas without ever emitting half a UTF-8
    character (byte-level BPE splits multi-byte characters across tokens)."""

    def __init__(self, tok: TextTokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix = 0  # start of the window re-decoded for context (spaces depend on it)
        self.read = 0  # tokens already turned into text

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            delta = now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is left (an incomplete character at the very end decodes as U+FFFD)."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]
