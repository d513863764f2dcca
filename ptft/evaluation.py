"""Evaluating a trained model on an eval split with the training loop's own evaluation (ptft
eval): the run's config, or the composed fine-tuning stage for a bare model directory."""

from __future__ import annotations

from ptft.config.schema import RootConfig
from ptft.errors import UsageError
from ptft.inference import (Target, classifier_labels, load_model, load_run_yaml,
                            validate_run_config)


def eval_config(target: Target, overrides: list[str]) -> RootConfig:
    """The config to evaluate with: the run's own (same data, seq_len, batches) with
    `overrides` applied, or, for a model directory without a run, the composed fine-tuning
    stage. A `stage=` override chooses the stage (e.g. stage=pretrain data=python-docs)."""
    from omegaconf import OmegaConf

    from ptft.config.compose import GROUPS, check_stage, compose, override, to_object

    keys = [o.lstrip("+~").split("=")[0] for o in overrides]
    if "model.path" in keys:
        raise UsageError("the model evaluated is the RUN_OR_MODEL_DIR argument; drop the "
                         "model.path= override.")
    stage = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("stage=")),
                 None)
    rest = [o for o in overrides if not o.startswith("stage=")]
    if target.run_dir is None:
        cfg = compose(check_stage(stage or "finetune"),
                      [override("model.path", target.tokenizer_dir), *rest])
        return to_object(cfg)

    run = load_run_yaml(target.run_dir)
    # Compose with the run's group choices (option names are the method name and data
    # source), so an override such as method.r=4 or data.paths=[...] is checked against
    # the blocks the run has; the user's own choices win.
    chosen = {k for k in keys if k in GROUPS}
    run_choices = [f"{g}={v}" for g, v in (("method", run.method.name), ("data", run.data.source))
                   if g not in chosen]
    composed = compose(check_stage(stage or run.stage.name), [*run_choices, *rest])
    # Start from the run's values; a group choice replaces its whole block, a key override
    # its key (with the value as composed: parsed and type-checked by Hydra and the schema).
    for key in dict.fromkeys(keys):
        OmegaConf.update(run, key, OmegaConf.select(composed, key), merge=False)
    run.model.path = target.tokenizer_dir
    validate_run_config(run, target.run_dir)
    return to_object(run)


def evaluate(target: Target, overrides: list[str]) -> dict:
    """Loss and perplexity (language models) or loss and accuracy (classifiers) on the eval
    split, computed by the training loop's own evaluation."""
    from ptft.data.batches import eval_batches
    from ptft.data.prepare import prepare_data
    from ptft.engine import objective
    from ptft.engine.device import autocast, autocast_dtype, resolve_device

    cfg = eval_config(target, overrides)
    data = prepare_data(cfg)
    if data.task != target.task:
        raise UsageError(_task_mismatch(target, data.task))
    labels = None
    if data.task == "classification":
        labels = classifier_labels(target)
        if list(data.labels) != list(labels):
            raise UsageError(f"the data's labels ({', '.join(data.labels)}) are not the ones "
                             f"the classifier was trained on ({', '.join(labels)}).")
    if len(data.eval) == 0:
        raise UsageError("the eval split is empty (smaller than one sequence of train.seq_len="
                         f"{cfg.train.seq_len}); raise data.eval_fraction or give data.eval_paths.")
    device = resolve_device(cfg.train)
    model = load_model(target, labels).to(device)
    with autocast(device, autocast_dtype(cfg.train, device)):
        result = objective.evaluate(model, eval_batches(data.eval, cfg.train.batch_size,
                                                        cfg.train.eval_batches),
                                    data.task, device)
    sequences = len(data.eval) if cfg.train.eval_batches == 0 else min(
        len(data.eval), cfg.train.eval_batches * cfg.train.batch_size)
    return {**result, "task": data.task, "model": str(target.model_dir),
            "data": cfg.data.source, "eval_sequences": sequences}


def _task_mismatch(target: Target, data_task: str) -> str:
    if target.task == "classification":
        return (f"{target.model_dir} is a classifier but the data is for language modelling; "
                "evaluate it on classification data (data=stdlib-topics, or your records with "
                "stage.task=classification).")
    return (f"{target.model_dir} is a language model but the data is for classification; "
            "evaluate it on text or SFT data (e.g. data=docstrings).")
