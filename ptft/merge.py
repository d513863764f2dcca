"""Folding a LoRA or IA3 run into its base model's weights: a plain model directory that loads
without peft or ptft (ptft merge)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ptft.errors import UsageError
from ptft.inference import ADAPTER, FULL, Target, load_model, load_tokenizer
from ptft.tempdirs import temporary_sibling


def merge_into_base(target: Target, output: Path | None) -> Path:
    """Fold a LoRA (or IA3) run into its base weights and save a plain model directory
    (safetensors + tokenizer). Written under a temporary name and renamed when complete."""
    _check_mergeable(target)
    if output is None:
        output = (target.run_dir / "merged" if target.run_dir is not None
                  else target.model_dir.with_name(target.model_dir.name + "-merged"))
    output = output.expanduser()
    if output.exists():
        raise UsageError(f"{output} already exists; remove it or choose --output DIR.")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(output)
    except OSError as err:
        raise UsageError(f"cannot write {output}: {err.strerror}.") from None
    try:
        tokenizer = load_tokenizer(target)
        merged = load_model(target).merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _check_mergeable(target: Target) -> None:
    where = target.run_dir or target.model_dir
    if target.kind == FULL:
        raise UsageError(f"{where} is already a full model: there is nothing to merge; use "
                         f"{target.model_dir} as it is.")
    if target.kind == ADAPTER:
        raise UsageError(f"{where} was trained with bottleneck adapters, which add new layers "
                         "(a down and an up projection with a non-linearity between them) "
                         "rather than changing existing weights, so they cannot be folded into "
                         "the base weights. Use the run as it is (ptft generate / ptft eval).")
    if target.peft_type not in ("LORA", "IA3"):
        raise UsageError(f"{where} was trained with {target.peft_type}, which learns extra "
                         "inputs rather than weight changes, so there is nothing to fold into "
                         "the base weights; only LoRA and IA3 runs can be merged.")
