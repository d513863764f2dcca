"""What is minimised and what is measured: summed losses, so the loop can normalise by the
number of targets of a whole step, and evaluation figures (loss, perplexity, accuracy)."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Iterable

import torch
import torch.nn.functional as F

from ptft.data.batches import IGNORE_INDEX, Batch
from ptft.engine.device import autocast
from ptft.engine.flops import unwrap_model
from ptft.engine.fused_loss import linear_cross_entropy
from ptft.engine.packed_attention import uses_packed_attention
from ptft.errors import UsageError


def _logits_and_loss(model, batch: Batch, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    # fp32 softmax: stable under autocast
    logits = model(**_model_inputs(model, batch)).logits.float()
    if task == "classification":
        return logits, F.cross_entropy(logits, batch.labels, reduction="sum")
    # Methods that prepend virtual tokens (prompt tuning) return longer logits: the
    # predictions for the real tokens are the last ones. (Only then: even a slice that keeps
    # everything costs a zero-filled copy of the logits' gradient in backward.)
    if logits.shape[1] != batch.labels.shape[1]:
        logits = logits[:, -batch.labels.shape[1]:]
    return logits, F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")


def loss_sum(model, batch: Batch, task: str, device: torch.device | None = None,
             chunked: bool = False) -> torch.Tensor:
    """Cross-entropy summed over the batch's targets (next tokens, or one label per example).
    `batch` may still be on the CPU (it is moved to `device`): which positions carry a target
    is then read there, without waiting for the device.

    Language modelling computes logits only where a loss reads them: a batch with positions
    that carry no target (masked prompts, padding) asks the model for the target positions'
    logits only (transformers' logits_to_keep), which skips most of the output projection on
    SFT data. `chunked` goes further for large vocabularies: the loss is computed from the
    final hidden states a chunk of rows at a time, and each chunk's logits are recomputed in
    backward, so the full (tokens x vocab) fp32 logits never exist at once."""
    if task == "classification":
        return _logits_and_loss(model, batch.to(device) if device else batch, task)[1]
    keep = _target_positions(model, batch)
    if device is not None:
        batch = batch.to(device)
    if chunked:
        return _chunked_lm_loss(model, batch, keep)
    if keep is None:
        return _logits_and_loss(model, batch, task)[1]
    logits = model(**_model_inputs(model, batch), logits_to_keep=keep).logits.float()
    if logits.dim() != 2 or logits.shape[0] != batch.num_targets:
        raise RuntimeError(f"{type(model).__name__} returned logits of shape "
                           f"{tuple(logits.shape)} for logits_to_keep: expected "
                           f"({batch.num_targets}, vocab)")
    # A CPU mask indexes a device tensor without a device sync (the positions are known here).
    return F.cross_entropy(logits, batch.labels[keep], reduction="sum")


def _model_inputs(model, batch: Batch) -> dict:
    """The batch's forward arguments, plus the packed samples' boundaries where the model runs
    the packed attention (ptft/engine/packed_attention.py)."""
    if batch.segments is None or not uses_packed_attention(model):
        return batch.inputs
    return {**batch.inputs, "packed_segments": batch.segments}


def _target_positions(model, batch: Batch) -> torch.Tensor | None:
    """The (B, T) bool mask of positions that carry a target, on the CPU, when the model can
    compute logits for just those and some positions carry none; else None (all logits)."""
    labels = batch.labels
    if labels.dim() != 2 or batch.num_targets == labels.numel():
        return None
    if is_prompt_learning(model) or not _supports_logits_to_keep(type(unwrap_model(model))):
        return None
    return (labels != IGNORE_INDEX).cpu()


def _chunked_lm_loss(model, batch: Batch, keep: torch.Tensor | None) -> torch.Tensor:
    """Summed next-token cross-entropy from the last hidden states through the fused linear
    cross-entropy (ptft/engine/fused_loss.py): the model computes no logits
    (logits_to_keep=[]) and the full (tokens x vocab) logits never exist."""
    head = output_projection(model)
    empty = torch.zeros(0, dtype=torch.long)
    out = model(**_model_inputs(model, batch), logits_to_keep=empty, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, -batch.labels.shape[1]:]  # after the final norm
    hidden, labels = hidden.flatten(0, 1), batch.labels.flatten()
    if keep is not None:
        index = keep.flatten().nonzero().squeeze(1).to(hidden.device)
        hidden, labels = hidden.index_select(0, index), labels.index_select(0, index)
    # Every row left is a target: the kept positions, or a batch whose labels are all targets.
    all_targets = keep is not None or batch.num_targets == batch.labels.numel()
    return linear_cross_entropy(hidden, head.weight, head.bias, labels, all_targets)


def output_projection(model) -> torch.nn.Linear:
    """The lm_head, checked to be a plain projection the chunked loss can apply itself."""
    problem = chunked_loss_problem(model)
    if problem:
        raise UsageError(f"train.chunked_loss=true: {problem}. Set train.chunked_loss=false "
                         "(or leave it unset: null picks it where it works).")
    return unwrap_model(model).get_output_embeddings()


def chunked_loss_problem(model) -> str | None:
    """Why the chunked loss cannot compute `model`'s language-modelling loss, or None if it
    can: it needs a causal LM of transformers whose logits are a plain, whole (unsharded)
    linear projection of its last hidden states, with positions that line up with the labels."""
    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    config = getattr(base, "config", None)
    # Logit processing some architectures do after the projection, which a loss computed from
    # the hidden states would silently leave out: soft-capping (Gemma 2/3), a multiplier
    # (Cohere's logit_scale) or a divisor (Granite's logits_scaling). 1 is the identity.
    scaled = getattr(config, "final_logit_softcapping", None) or any(
        getattr(config, k, None) not in (None, 1) for k in ("logit_scale", "logits_scaling"))
    if type(head) is not torch.nn.Linear or scaled or \
            not _supports_logits_to_keep(type(base)):
        return (f"it needs a causal LM whose logits are a plain linear projection of its last "
                f"hidden states; {type(base).__name__} is not one (an adapted or scaled "
                f"lm_head, or no logits_to_keep)")
    if type(head.weight).__name__ == "DTensor":
        return "the output projection is sharded (train.strategy=fsdp); use train.strategy=ddp"
    if is_prompt_learning(model):
        return "prompt tuning prepends virtual tokens, so positions do not line up with labels"
    return None


def is_prompt_learning(model) -> bool:
    """peft prompt tuning: the model prepends virtual tokens, so its positions do not line up
    with the labels."""
    while hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    model = getattr(model, "_orig_mod", model)
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


@functools.lru_cache(maxsize=None)
def _supports_logits_to_keep(model_class: type) -> bool:
    """Models of transformers itself that slice their hidden states with its
    slice_logits_to_keep, in a version where a (B, T) bool mask selects positions. Remote code
    might read the argument otherwise, so it gets full logits."""
    import sys

    module = sys.modules.get(model_class.__module__)
    slicer = getattr(module, "slice_logits_to_keep", None)
    if not model_class.__module__.startswith("transformers.") or slicer is None or \
            "logits_to_keep" not in inspect.signature(model_class.forward).parameters:
        return False
    try:
        kept = slicer(torch.zeros(1, 2, 1), torch.tensor([[False, True]]))
    except Exception:  # an older transformers: integers and 1-D positions only
        return False
    return tuple(kept.shape) == (1, 1)


def accumulate_gradients(model, micro_batches: list[Batch], task: str, device: torch.device,
                         amp_dtype: torch.dtype | None, world=None,
                         chunked: bool = False) -> tuple[torch.Tensor, int]:
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
                summed = loss_sum(model, batch, task, device, chunked)
            (summed * scale).backward()
        total += summed.detach()
    return total, step_targets


@torch.no_grad()
def evaluate(model, batches: Iterable[Batch], task: str, device: torch.device,
             chunked: bool = False) -> dict:
    """Mean loss per target and perplexity; accuracy for classification. `chunked`: the loss
    without whole logits, as in training (see loss_sum)."""
    model.eval()
    total, targets = torch.zeros((), device=device), 0
    correct = torch.zeros((), device=device, dtype=torch.long)
    for batch in batches:
        if task == "classification":
            batch = batch.to(device)
            logits, summed = _logits_and_loss(model, batch, task)
            correct += (logits.argmax(-1) == batch.labels).sum()
        else:
            summed = loss_sum(model, batch, task, device, chunked)
        total += summed
        targets += batch.num_targets
    loss = total.item() / max(targets, 1)
    result = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
    if task == "classification":
        result = {"eval_loss": loss, "eval_accuracy": correct.item() / max(targets, 1)}
    return result
