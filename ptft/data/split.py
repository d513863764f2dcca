"""The train/eval split: by a hash of a stable key (a document id, or a module name for the
embedded fine-tuning data), so an item stays on its side when the data grows, on every
machine (sha256, unlike hash(), is the same in every process)."""

from __future__ import annotations

import hashlib
from typing import Iterable


def score(key: str) -> float:
    """A uniform number in [0, 1) fixed by `key`."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def held_out(keys: Iterable[str], fraction: float) -> set[str]:
    """The keys whose score falls below `fraction`. With few keys that may be none or all:
    then at least one key is held out and at least one kept, so both splits have data."""
    keys = sorted(set(keys))
    if fraction <= 0 or len(keys) < 2:
        return set()
    scores = {key: score(key) for key in keys}
    chosen = {key for key, s in scores.items() if s < fraction}
    if not chosen:
        chosen = {min(scores, key=scores.get)}
    if len(chosen) == len(keys):
        chosen.discard(max(scores, key=scores.get))
    return chosen
