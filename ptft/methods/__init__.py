"""Training methods: what part of a model trains and how the result is saved.

Each method module has apply(model, cfg, task) (before training) and save_final(model,
tokenizer, path, state_dict) (after); the training loop is the same for all of them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ptft.methods import adapter, full, peft_methods

_METHODS = {"full": full, "adapter": adapter, "lora": peft_methods, "ia3": peft_methods,
            "prompt_tuning": peft_methods}


def apply_method(model: torch.nn.Module, cfg, task: str) -> torch.nn.Module:
    """Prepare `model` for training with method `cfg` on `task` ("lm" or "classification")."""
    return _METHODS[cfg.name].apply(model, cfg, task)


def save_final(model: torch.nn.Module, tokenizer, path: Path, cfg,
               state_dict: dict | None = None) -> None:
    """Write final/. `state_dict`: the whole weights of a sharded (FSDP) model, gathered (its
    own parameters are shards then); None: the model's own."""
    _METHODS[cfg.name].save_final(model, tokenizer, path, state_dict)
    tokenizer.save_pretrained(path)
