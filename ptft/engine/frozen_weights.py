"""Frozen projection weights kept in the autocast dtype (LoRA, IA3, adapters under bf16).

Under autocast every matmul casts its fp32 weight to bf16 (or fp16) on each forward. A trained
weight needs its fp32 master copy anyway (the optimizer updates it), but a frozen one never
changes: storing it once in the autocast dtype gives the very same bf16 values the cast would
(both round to nearest even), so results are bit for bit the same, while the frozen base takes
half the memory and the per-step casts disappear. This is how LoRA is usually run: a bf16 base
and fp32 adapter weights.

Only the weights (and biases) of dense projections (nn.Linear, GPT-2's Conv1D) that do not train
are converted; a weight shared with another kind of module (a tied input embedding, whose
lookup autocast leaves in fp32) and the base layers of peft's LoRA variants (DoRA reads the
base weight outside the matmul) keep their dtype. Nothing trainable changes, so checkpoints and
final/ (which hold trainable weights only) are as before.
"""

from __future__ import annotations

import torch

from ptft.engine.flops import matmul_shape


def store_frozen_projections_in(model: torch.nn.Module, dtype: torch.dtype | None) -> int:
    """Convert `model`'s frozen projection weights to `dtype` (the autocast dtype; None: plain
    fp32, nothing to do) in place. Returns how many parameters were converted."""
    if dtype is None:
        return 0
    keep = _shared_with_other_modules(model) | _read_outside_the_matmul(model)
    converted = 0
    for module in model.modules():
        if matmul_shape(module) is None:
            continue
        params = list(module.parameters(recurse=False))
        if any(p.requires_grad or id(p) in keep for p in params):
            continue
        for param in params:
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)  # the same Parameter object, new storage
                converted += param.numel()
    return converted


def _shared_with_other_modules(model: torch.nn.Module) -> set[int]:
    """Parameters that a module other than a projection also owns (tied embeddings)."""
    return {id(p) for module in model.modules() if matmul_shape(module) is None
            for p in module.parameters(recurse=False)}


def _read_outside_the_matmul(model: torch.nn.Module) -> set[int]:
    """The base-layer weights of peft LoRA layers that use a variant (DoRA and the like)."""
    keep: set[int] = set()
    for module in model.modules():
        if getattr(module, "lora_variant", None) and hasattr(module, "get_base_layer"):
            keep.update(id(p) for p in module.get_base_layer().parameters())
    return keep
