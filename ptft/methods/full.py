"""Full training: every weight trains; the result is a complete Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

import torch


def apply(model: torch.nn.Module, cfg, task: str) -> torch.nn.Module:
    model.requires_grad_(True)
    return model


def save_final(model, tokenizer, path: Path, state_dict: dict | None = None) -> None:
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
