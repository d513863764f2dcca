"""Training methods: what part of a model trains and how the result is saved.

Each method is a pair of functions, apply (before training) and save_final (after); the
training loop is the same for all of them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ptft.methods import full

_METHODS = {"full": full}


def apply_method(model: torch.nn.Module, cfg) -> torch.nn.Module:
    return _METHODS[cfg.name].apply(model, cfg)


def save_final(model: torch.nn.Module, tokenizer, path: Path, cfg) -> None:
    _METHODS[cfg.name].save_final(model, tokenizer, path)
    tokenizer.save_pretrained(path)
