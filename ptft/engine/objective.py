"""What is minimised and what is measured: summed losses, so the loop can normalise by the
number of targets of a whole step, and evaluation figures (loss, perplexity, accuracy)."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

from ptft.data.batches import IGNORE_INDEX, Batch
from ptft.engine.device import autocast


def _logits_and_loss(model, batch: Batch, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(**batch.inputs).logits.float()  # fp32 softmax: stable under autocast
    if task == "classification":
        return logits, F.cross_entropy(logits, batch.labels, reduction="sum")
    # Methods that prepend virtual tokens (prompt tuning) return longer logits: the
    # predictions for the real tokens are the last ones.
    logits = logits[:, -batch.labels.shape[1]:]
    return logits, F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")


def loss_sum(model, batch: Batch, task: str) -> torch.Tensor:
    """Cross-entropy summed over the batch's targets (next tokens, or one label per example)."""
    return _logits_and_loss(model, batch, task)[1]


def accumulate_gradients(model, micro_batches: list[Batch], task: str, device: torch.device,
                         amp_dtype: torch.dtype | None, world=None) -> tuple[torch.Tensor, int]:
    """Backward over one optimizer step's micro-batches. Each loss is divided by the targets
    of the WHOLE step on ALL ranks, so batch 8 x accum 1, batch 2 x accum 4 and 2 ranks x
    batch 4 give the same gradient even when micro-batches hold different numbers of targets.
    Returns (this rank's summed loss, the step's targets over all ranks)."""
    from ptft.engine.distributed import World, gradient_sync

    world = world or World()
    local_targets = sum(batch.num_targets for batch in micro_batches)
    step_targets = int(world.sum([local_targets], device)[0])
    # DDP and FSDP average gradients over ranks; multiplying by the world size makes that
    # average a sum, so the result is the global-token-normalised gradient.
    scale = world.world_size / step_targets
    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        with gradient_sync(model, enabled=i == len(micro_batches) - 1):
            with autocast(device, amp_dtype):
                summed = loss_sum(model, batch.to(device), task)
            (summed * scale).backward()
        total += summed.detach()
    return total, step_targets


@torch.no_grad()
def evaluate(model, batches: Iterable[Batch], task: str, device: torch.device) -> dict:
    """Mean loss per target and perplexity; accuracy for classification."""
    model.eval()
    total, targets = torch.zeros((), device=device), 0
    correct = torch.zeros((), device=device, dtype=torch.long)
    for batch in batches:
        batch = batch.to(device)
        logits, summed = _logits_and_loss(model, batch, task)
        total += summed
        targets += batch.num_targets
        if task == "classification":
            correct += (logits.argmax(-1) == batch.labels).sum()
    loss = total.item() / max(targets, 1)
    result = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
    if task == "classification":
        result = {"eval_loss": loss, "eval_accuracy": correct.item() / max(targets, 1)}
    return result
