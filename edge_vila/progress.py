"""Progress bars with ETA for long work (tqdm), which `edge-vila -q` turns off everywhere.

tqdm reads TQDM_DISABLE only for bars that do not pass `disable=` themselves; ours do (a
DDP worker or a library caller turns its bar off), so the quiet switch is checked here.
"""
from __future__ import annotations

import os

from tqdm import tqdm as _tqdm

QUIET_ENV = "EDGE_VILA_QUIET"


def tqdm(*args, disable: bool = False, **kwargs) -> _tqdm:
    return _tqdm(*args, disable=disable or os.environ.get(QUIET_ENV) == "1", **kwargs)
