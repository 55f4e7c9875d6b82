"""The Python API: `edge_vila.load(path)` -> Pipeline; `pipe.chat()` -> Chat.

    pipe = edge_vila.load("ckpt/")                  # or a bundle (ONNX) folder
    print(pipe.generate("What is in the image?", images=["photo.png"]))
    chat = pipe.chat()
    for delta in chat.stream("Describe it.", images=[frame]): ...
    chat.send("And the colour?")                    # prefills only the new turn
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .config import VilaConfig, load_config
from .errors import InputError
from .generate import GenerationStats, Generator, SamplingParams
from .options import DEFAULT_CONTEXT, RuntimeOptions
from .preprocess import ImageLike, message_tiles, pixel_limit, tiles_message
from .prompt import (IMAGE_PLACEHOLDER, ChatTemplate, ImageKey, Key, TextTokenizer, encode_with_images,
                     get_template, guess_template)

log = logging.getLogger(__name__)



def load(path: str | Path, options: RuntimeOptions | None = None, *, template: str | None = None,
         system: str | None = None, **runtime) -> "Pipeline":
    """Load a bundle (ONNX Runtime; TensorRT on the device), a VILA checkpoint (torch
    reference) or a plain HF LLM folder (text-only).

    How it runs is one `RuntimeOptions` (see its fields), given whole or as keywords:
    `load(p, RuntimeOptions(kv_cache="fp32"))` and `load(p, kv_cache="fp32")` are the same;
    keywords given with `options` override its fields.

    On the CPU an INT4 bundle runs ORT's fast graph (built once, cached and verified inside
    the bundle; `edge-vila build --target ort-cpu` makes it ahead of time), with an INT8 KV
    cache whose scales the bundle brings, unless `exact`. `max_tiles` caps NVILA-Lite's
    dynamic tiling (and NVILA-8B's last S2 scale); `max_pixels` refuses, before decoding, an
    image whose header claims more pixels (per pipeline)."""
    opts = options or RuntimeOptions()
    if runtime:
        opts = opts.replace(**runtime)
    from .bundle import is_bundle

    if is_bundle(path):
        pipe = _load_bundle(Path(path), opts, template, system)
        _cap_tiles(pipe.cfg, opts.max_tiles)
        return pipe
    cfg = load_config(path)
    _cap_tiles(cfg, opts.max_tiles)
    if opts.backend not in ("auto", "torch"):
        raise InputError(f"{path}: a checkpoint runs on the torch backend; export a bundle for {opts.backend}")
    if opts.wants_bundle_features:
        raise InputError(f"{path}: the INT8 KV cache, our ops and the INT8 head are a bundle feature (ONNX Runtime CPU); "
                         "export a bundle")
    ctx = opts.max_context or min(cfg.llm.max_position_embeddings, DEFAULT_CONTEXT)
    from .backends.torch import TorchBackend

    be = TorchBackend(cfg, ctx, dtype=opts.dtype, threads=opts.threads)
    return Pipeline(cfg, be, TextTokenizer(cfg.llm_dir), template=template, system=system, options=opts)


def _cap_tiles(cfg, max_tiles: int | None) -> None:
    pre = cfg.preprocess
    if max_tiles is None or pre is None:
        return
    if not (pre.tiled or pre.s2):
        log.warning("max_tiles=%d ignored: %s does not tile its images (image_aspect_ratio %s)", max_tiles,
                    cfg.root, pre.mode)
        return
    if not pre.min_tiles <= max_tiles:
        raise InputError(f"max_tiles {max_tiles} is below the checkpoint's min_tiles {pre.min_tiles}")
    cfg.preprocess = dataclasses.replace(pre, max_tiles=min(max_tiles, pre.max_tiles))


def _tensorrt_ready(path: Path) -> bool:
    """`auto` prefers TensorRT where it is importable and engines were built in the bundle."""
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None and any((path / "engines").glob("trt*/engine_key.json"))


def _load_bundle(path: Path, opts: RuntimeOptions, template: str | None, system: str | None) -> "Pipeline":
    from .bundle import load_bundle_config

    cfg = load_bundle_config(path)
    backend = opts.backend
    if backend == "torch":
        raise InputError(f"{path}: a bundle runs on onnxruntime or tensorrt; use the checkpoint for torch")
    if backend == "auto" and _tensorrt_ready(path):
        backend = "tensorrt"
    if backend == "tensorrt":
        try:
            from .backends.tensorrt import TensorRTBackend
        except ImportError as e:
            raise InputError(f"TensorRT backend unavailable here ({e}); use --backend onnxruntime") from None

        be = TensorRTBackend(cfg, opts.max_context)
    else:
        from .backends.onnxruntime import OrtBackend

        be = OrtBackend(cfg, opts)
    return Pipeline(cfg, be, TextTokenizer(path), template=template,
                    system=system if system is not None else (cfg.system if not template else None), options=opts)


class Pipeline:
    def __init__(self, cfg: VilaConfig, backend, tokenizer: TextTokenizer, template: str | None = None,
                 system: str | None = None, options: RuntimeOptions | None = None):
        self.cfg = cfg
        self.options = options or RuntimeOptions()
        self.backend = backend
        self.tokenizer = tokenizer
        name = template or cfg.chat_template
        base = get_template(name) if name else guess_template(tokenizer, tokenizer.jinja)
        self.template: ChatTemplate = dataclasses.replace(base, system=system) if system is not None else base
        stop_ids = [tokenizer.token_id(s) for s in self.template.stop]
        eos = set(cfg.llm.eos_token_ids) | {i for i in stop_ids if i is not None}
        if tokenizer.eos_id is not None:
            eos.add(tokenizer.eos_id)
        # stop strings that are single special tokens are handled as ids (their text is skipped on decode)
        strings = [s for s, i in zip(self.template.stop, stop_ids) if i is None]
        self.generator = Generator(backend, tokenizer, sorted(eos), strings)
        self._image_cache: OrderedDict[str, np.ndarray] = OrderedDict()

    # ---- images -------------------------------------------------------------------
    @property
    def tokens_per_image(self) -> int:
        return self.cfg.tokens_per_image

    def encode_images(self, images: Sequence[ImageLike]) -> list[list[str]]:
        """Preprocess + encode the images of one message (cached by pixel hash); returns each
        image's vision-input hashes (one, or its tiles then thumbnail in dynamic mode)."""
        if not images:
            return []
        if not self.cfg.is_multimodal:
            raise InputError(f"{self.cfg.root}: text-only model, it cannot take images")
        with pixel_limit(self.options.max_pixels):
            if self.cfg.preprocess.s2:
                return self._encode_s2(images)
            per_image = message_tiles(images, self.cfg.preprocess)
        pixels = np.concatenate(per_image)
        hashes = [hashlib.sha1(p.tobytes()).hexdigest()[:16] for p in pixels]
        todo = sorted({h: i for i, h in enumerate(hashes) if h not in self._image_cache}.values())
        if todo:
            emb = self.backend.encode_images(pixels[todo])
            for i, e in zip(todo, emb):
                self._image_cache[hashes[i]] = e
        for h in hashes:
            self._image_cache.move_to_end(h)
        while len(self._image_cache) > max(32, len(hashes)):
            self._image_cache.popitem(last=False)
        out, at = [], 0
        for p in per_image:
            out.append(hashes[at:at + len(p)])
            at += len(p)
        return out

    def _encode_s2(self, images: Sequence[ImageLike]) -> list[list[str]]:
        """dynamic_s2: an image's tokens come from all its tiles at once (merged across scales),
        so the cache holds whole images: one hash (of its tiles and grid) per image."""
        from . import s2

        out = []
        for pixels, grid in s2.message_inputs(images, self.cfg.preprocess):
            h = hashlib.sha1(pixels.tobytes() + repr(grid).encode()).hexdigest()[:16]
            if h not in self._image_cache:
                self._image_cache[h] = s2.encode(self.backend, pixels, grid, self.cfg.preprocess.s2_scales)
            self._image_cache.move_to_end(h)
            out.append([h])
        while len(self._image_cache) > max(32, len(out)):
            self._image_cache.popitem(last=False)
        return out

    def image_token_counts(self, hashes: Sequence[str]) -> dict[str, int]:
        """Embeddings of each cached vision input (a tile's: tokens_per_image; an S2 image's: its blocks')."""
        return {h: len(self._image_cache[h]) for h in hashes}

    def image_embeds(self, hashes: Sequence[str]) -> dict[str, np.ndarray]:
        return {h: self._image_cache[h] for h in hashes}

    # ---- generation -------------------------------------------------------------------
    def chat(self, system: str | None = None, history: Sequence["Turn"] = ()) -> "Chat":
        """A conversation; `history` starts it from past turns (prefilled on the first new
        turn, nothing generated for them), e.g. a conversation restored from a log."""
        chat = Chat(self, system)
        for turn in history:
            chat.add_turn(turn.user, turn.assistant, turn.images)
        return chat

    def stream(self, prompt: str, images: Sequence[ImageLike] = (), params: SamplingParams | None = None,
               **sampling) -> Iterator[str]:
        """One user turn (a fresh conversation), streamed. The cached prefix (system
        prompt, unchanged images) is still reused across calls."""
        return Chat(self).stream(prompt, images, params, **sampling)

    def generate(self, prompt: str, images: Sequence[ImageLike] = (), params: SamplingParams | None = None,
                 **sampling) -> str:
        return "".join(self.stream(prompt, images, params, **sampling))

    @property
    def stats(self) -> GenerationStats:
        return self.generator.last_stats


@dataclasses.dataclass(frozen=True)
class Turn:
    """One past exchange: what the user said (with its images) and what the assistant answered."""
    user: str
    assistant: str
    images: Sequence[ImageLike] = ()


class Chat:
    """A multi-turn conversation whose history stays in the KV cache between turns."""

    def __init__(self, pipe: Pipeline, system: str | None = None):
        self.pipe = pipe
        self.system = system
        self.keys: list[Key] = []
        self.images: list[str] = []
        self.turns: list[tuple[str, str]] = []

    def _head(self) -> list[Key]:
        t, tok = self.pipe.template, self.pipe.tokenizer
        keys: list[Key] = [tok.bos_id] if t.add_bos and tok.bos_id is not None else []
        return keys + tok.encode(t.head(self.system)) if t.head(self.system) else keys

    def prompt_keys(self, message: str, images: Sequence[ImageLike] = ()) -> tuple[list[Key], list[str], str]:
        """Keys of the conversation so far plus this user turn; also the image hashes and
        the message with its <image> markers placed as the template places them."""
        pipe, t = self.pipe, self.pipe.template
        tiles = pipe.encode_images(images)
        layout = pipe.cfg.image_tokens
        n_marks = message.count(IMAGE_PLACEHOLDER)
        if tiles and n_marks == 0:
            message = t.attach_images(message, len(tiles), layout.marker_sep)
        elif n_marks != len(tiles):
            raise InputError(f"message has {n_marks} {IMAGE_PLACEHOLDER} markers but {len(tiles)} images were given")
        keys = list(self.keys) if self.keys else self._head()
        flat = [h for image in tiles for h in image]
        # each cached input knows its own length: a tile's is tokens_per_image, an S2 image's varies
        turn, _ = encode_with_images(pipe.tokenizer, t.user(message), tiles, pipe.image_token_counts(flat),
                                     layout=layout, tiled=tiles_message(len(tiles), pipe.cfg.preprocess))
        return keys + turn, flat, message

    def stream(self, message: str, images: Sequence[ImageLike] = (), params: SamplingParams | None = None,
               **sampling) -> Iterator[str]:
        params = params or SamplingParams(**sampling)
        pipe, t = self.pipe, self.pipe.template
        keys, hashes, message = self.prompt_keys(message, images)
        self.images += hashes
        reply = ""
        for delta in pipe.generator.stream(keys, pipe.image_embeds(self.images), params):
            reply += delta
            yield delta
        st = pipe.generator.last_stats
        if st.finish_reason == "stop":  # ended on an EOS token: keep the exact tokens, close the turn
            reply_keys = st.tokens[:-1]
        elif st.finish_reason == "stop_string":
            reply_keys = pipe.tokenizer.encode(reply)
        else:
            reply_keys = st.tokens
        self.keys = keys + reply_keys + pipe.tokenizer.encode(t.assistant_end)
        self.turns.append((message, reply))

    def add_turn(self, message: str, reply: str, images: Sequence[ImageLike] = ()) -> None:
        """Append a past exchange without generating: its tokens join the conversation's keys
        (the next turn prefills them with itself), its images are encoded now."""
        keys, hashes, message = self.prompt_keys(message, images)
        tok = self.pipe.tokenizer
        self.keys = keys + tok.encode(reply) + tok.encode(self.pipe.template.assistant_end)
        self.images += hashes
        self.turns.append((message, reply))

    def send(self, message: str, images: Sequence[ImageLike] = (), params: SamplingParams | None = None,
             **sampling) -> str:
        return "".join(self.stream(message, images, params, **sampling))

    def reset(self) -> None:
        self.keys, self.images, self.turns = [], [], []


__all__ = ["load", "Pipeline", "Chat", "Turn", "RuntimeOptions", "SamplingParams", "ImageKey"]
