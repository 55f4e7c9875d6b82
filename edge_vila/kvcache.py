"""Prefix reuse bookkeeping for a backend's preallocated KV cache.

The backend owns the cache memory (allocated once at max context). This module only
remembers which key sits at which position, so that a new request forwards just the
keys after the longest common prefix: a second chat turn prefills only its new tokens,
and a new camera frame recomputes only its image tokens and what follows.
"""
from __future__ import annotations

from typing import Sequence

from .prompt import Key


def common_prefix(a: Sequence[Key], b: Sequence[Key]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixState:
    """What the backend cache holds, position by position."""

    def __init__(self, max_context: int):
        self.max_context = max_context
        self.keys: list[Key] = []

    def plan(self, keys: Sequence[Key]) -> int:
        """First position to forward for `keys`. At least the last key is always
        forwarded, because its logits are what the next token is sampled from."""
        return min(common_prefix(self.keys, keys), len(keys) - 1)

    def wrote(self, start: int, keys: Sequence[Key]) -> None:
        """The backend wrote `keys` at positions start..; anything after is stale."""
        del self.keys[start:]
        self.keys.extend(keys)

    def reset(self) -> None:
        self.keys.clear()
