"""AdamW with decoupled weight decay, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from ptft.config.schema import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters. Weight decay goes to matrices and embeddings
    (dim >= 2) only: decaying biases and norm gains pulls them towards 0, which hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # The fused kernel (one launch for all parameters) is the fastest where it exists.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """The learning rate of step `step` (0-based) of `total_steps`: linear warm-up that
    reaches cfg.lr at the last warm-up step, then cosine decay that reaches lr * min_lr_ratio
    at the run's last step (total_steps - 1), neither value held for two steps. A pure
    function of the step, so resuming needs no scheduler state."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step + 1 - cfg.warmup_steps) / decay_steps)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def planned_steps(cfg: TrainConfig, train_sequences: int, world_size: int) -> int:
    """Optimizer steps of the run: train.max_steps, or enough for train.epochs passes over
    `train_sequences` when max_steps is null. Each step takes batch_size x grad_accum
    sequences on every one of the `world_size` processes."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.grad_accum * world_size
    return max(1, math.ceil((cfg.epochs or 1) * train_sequences / per_step))
