"""Sampling, stop rules and the decode loop, written once above every backend."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Protocol, Sequence

import numpy as np

from .errors import ContextOverflowError, InputError
from .kvcache import PrefixState
from .prompt import ImageKey, Key, StreamDetokenizer, TextTokenizer

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What a runtime (torch, ONNX Runtime, TensorRT) provides. Arrays are numpy float32."""
    name: str
    max_context: int
    hidden_size: int
    tokens_forwarded: int  # counter of positions run through the LLM (tests use it)

    def embed(self, token_ids: np.ndarray) -> np.ndarray: ...  # [n] -> [n, D]

    def encode_images(self, pixels: np.ndarray) -> np.ndarray: ...  # [N,3,H,W] -> [N,T,D]
    # dynamic_s2 bundles: encode_images gives the ViT's features [N,g·g,C] and project turns
    # blocks merged across scales [B,g·g,C·scales] into tokens [B,t·t,D] (edge_vila.s2.encode)

    def project(self, features: np.ndarray) -> np.ndarray: ...

    def forward(self, embeds: np.ndarray, start: int) -> np.ndarray: ...  # [n,D] at start.. -> logits [V]


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):  # NaN fails every comparison
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise InputError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's penalty as transformers applies it: divide positive logits, multiply negative."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    out = logits.copy()
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def sample_token(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator,
                 seen: np.ndarray | None = None) -> int:
    logits = np.asarray(logits, dtype=np.float32)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.temperature == 0:
        return int(np.argmax(logits))
    logits = logits / np.float32(p.temperature)
    if p.top_k and p.top_k < logits.size:
        kth = np.partition(logits, -p.top_k)[-p.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, p.top_p) + 1)]  # smallest set reaching top_p
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.size, p=probs))


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # served from the KV cache
    prefill_tokens: int = 0  # forwarded for the prompt
    new_tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    finish_reason: str = ""
    tokens: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0


class Generator:
    """Runs prompts (as keys) through a backend, reusing the cached prefix."""

    def __init__(self, backend: Backend, tokenizer: TextTokenizer, eos_ids: Sequence[int],
                 stop_strings: Sequence[str] = ()):
        self.backend = backend
        self.tok = tokenizer
        self.eos_ids = set(eos_ids)
        self.stop_strings = tuple(stop_strings)
        self.state = PrefixState(backend.max_context)
        self.last_stats = GenerationStats()

    def _embed(self, keys: Sequence[Key], images: Mapping[str, np.ndarray]) -> np.ndarray:
        """Embeddings for keys: token runs looked up on the host, image runs spliced in."""
        chunks: list[np.ndarray] = []
        i = 0
        while i < len(keys):
            j = i
            if isinstance(keys[i], ImageKey):
                img = keys[i].image
                while j < len(keys) and isinstance(keys[j], ImageKey) and keys[j].image == img \
                        and keys[j].index == keys[i].index + (j - i):
                    j += 1
                chunks.append(images[img][keys[i].index: keys[i].index + (j - i)])
            else:
                while j < len(keys) and not isinstance(keys[j], ImageKey):
                    j += 1
                chunks.append(self.backend.embed(np.asarray(keys[i:j], dtype=np.int64)))
            i = j
        return np.concatenate(chunks, axis=0) if len(chunks) > 1 else chunks[0]

    def _forward(self, keys: Sequence[Key], start: int, images: Mapping[str, np.ndarray]) -> np.ndarray:
        logits = self.backend.forward(self._embed(keys, images), start)
        self.state.wrote(start, keys)
        return logits

    def stream(self, keys: Sequence[Key], images: Mapping[str, np.ndarray],
               params: SamplingParams) -> Iterator[str]:
        """Yield text deltas; `last_stats` holds timings and the generated token ids."""
        keys = list(keys)
        ctx = self.backend.max_context
        if not keys:
            raise InputError("empty prompt")
        if len(keys) >= ctx:
            n_img = sum(isinstance(k, ImageKey) for k in keys)
            raise ContextOverflowError(f"prompt is {len(keys)} tokens ({n_img} of them image tokens) but the "
                                       f"context holds {ctx}; shorten the prompt, use fewer images or raise max_context")
        stats = self.last_stats = GenerationStats(prompt_tokens=len(keys))
        rng = np.random.default_rng(params.seed)
        stops = self.stop_strings + tuple(params.stop)
        t0 = time.perf_counter()
        start = self.state.plan(keys)
        stats.reused_tokens, stats.prefill_tokens = start, len(keys) - start
        logits = self._forward(keys[start:], start, images)
        budget = min(params.max_new_tokens, ctx - len(keys))
        seen = {k for k in keys if not isinstance(k, ImageKey)} if params.repetition_penalty != 1.0 else set()
        detok = StreamDetokenizer(self.tok)
        text, emitted = "", 0
        pos = len(keys)
        t_first = None
        while True:
            tok = sample_token(logits, params, rng, np.fromiter(seen, np.int64) if seen else None)
            if t_first is None:
                t_first = time.perf_counter()
                stats.ttft_s = t_first - t0
            stats.tokens.append(tok)
            stats.new_tokens += 1
            if tok in self.eos_ids:
                stats.finish_reason = "stop"
                break
            if params.repetition_penalty != 1.0:
                seen.add(tok)
            text += detok.push(tok)
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
                stats.finish_reason = "stop_string"
                break
            safe = len(text) - held_back(text, stops)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            if stats.new_tokens >= budget:
                stats.finish_reason = "length"
                break
            logits = self._forward([tok], pos, images)
            pos += 1
        if stats.finish_reason != "stop_string":
            text += detok.flush()
        if len(text) > emitted:
            yield text[emitted:]
        t_end = time.perf_counter()
        stats.decode_s = t_end - (t_first or t_end)
        stats.total_s = t_end - t0
        log.debug("generated %d tokens (%s), ttft %.3fs", stats.new_tokens, stats.finish_reason, stats.ttft_s)

    def generate(self, keys: Sequence[Key], images: Mapping[str, np.ndarray], params: SamplingParams) -> str:
        return "".join(self.stream(keys, images, params))
