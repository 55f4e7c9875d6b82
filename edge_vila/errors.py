"""User-facing errors.

Every error a user can cause (bad path, bad key, bad image, prompt too long) is an
`EdgeVilaError` whose message is one line naming the file/key and what was expected.
The CLI prints that line and exits 2 instead of showing a traceback.
"""
from __future__ import annotations


class EdgeVilaError(Exception):
    """Base class: a problem with the user's input, files or settings."""


class CheckpointError(EdgeVilaError):
    """A checkpoint folder is missing files or has inconsistent contents."""


class InputError(EdgeVilaError):
    """An image, prompt or argument passed at run time is not usable."""


class ContextOverflowError(InputError):
    """The prompt (plus images) does not fit in the model's context."""


class ImageTooLargeError(InputError):
    """An image whose header claims more pixels than the limit (a decompression bomb, or just
    too big to be worth decoding): refused before its pixels are decoded."""
