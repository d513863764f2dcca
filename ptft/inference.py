"""Using a trained model: what a RUN_OR_MODEL_DIR argument points at, and loading it whatever
the method that trained it. What is done with it lives next door: ptft/generation.py
(generate, classify), ptft/merge.py, ptft/evaluation.py.

A run's `final/` is one of three shapes (see ptft/methods):
    full       a plain Hugging Face model directory (config.json + weights)
    peft       a PEFT adapter directory (adapter_config.json): LoRA, IA3, prompt tuning
    adapter    ptft's bottleneck adapters (ptft_adapter_config.json)
The last two hold only what training changed, so the base model named in their config is
loaded first. The tokenizer is always saved in `final/`.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from ptft.config.schema import RootConfig
from ptft.errors import UsageError, first_line

FULL, PEFT, ADAPTER = "full", "peft", "adapter"
PEFT_CONFIG = "adapter_config.json"
# A classifier's output head, by the names transformers gives it (Llama/GPT-2: score).
HEAD_NAMES = ("score", "classifier")


@dataclass
class Target:
    """A model to use, as found on disk."""
    model_dir: Path
    """The directory holding the model (a run's final/) and its tokenizer."""
    run_dir: Path | None
    """The run that produced it (it has config.yaml), when there is one."""
    kind: str
    """full, peft or adapter."""
    task: str
    """lm or classification."""
    base: str | None
    """The base model that a peft/adapter directory applies to (None for full)."""

    @property
    def peft_type(self) -> str | None:
        """LORA, IA3, PROMPT_TUNING, ... for a peft directory."""
        if self.kind != PEFT:
            return None
        return _read_json(self.model_dir / PEFT_CONFIG).get("peft_type")

    @property
    def tokenizer_dir(self) -> str:
        """A model.path for ptft.data.prepare_data: it loads the tokenizer from model.path and
        first checks that the folder is a full model directory (config.json), which a peft or
        adapter final/ is not. Their tokenizer is the base's, saved unchanged (the chat template
        that prepare_data adds when missing is the same default either way), so the base
        gives identical tokens."""
        return str(self.model_dir) if self.kind == FULL else str(self.base)


# ---- finding and describing ---------------------------------------------------------------

def locate(path: str) -> Target:
    """The model a RUN_OR_MODEL_DIR argument means: a run directory (its final/), a run's
    final/ or merged/ itself, or any model directory."""
    given = Path(path).expanduser()
    if not given.is_dir():
        raise UsageError(f"{path} is not a directory; give a run directory (it holds final/) "
                         "or a model directory.")
    if _is_checkpoint(given):
        raise UsageError(_checkpoint_hint(path, given))
    if (given / "config.yaml").is_file() and _model_kind(given) is None:
        run_dir, model_dir = given, given / "final"
        if not model_dir.is_dir():
            raise UsageError(f"the run {path} has no final/ model: it has not finished (or "
                             "stopped early). Resume it, or point at a model directory.")
    else:
        model_dir = given
        # `<run>/final` (or the `<run>/merged` that `ptft merge` writes) given directly still
        # belongs to its run: its config, labels and chat mode apply.
        run_dir = given.parent if (given.name in ("final", "merged")
                                   and (given.parent / "config.yaml").is_file()) else None
    kind = _model_kind(model_dir)
    if kind is None:
        raise UsageError(f"{model_dir} is not a model directory: it has no config.json "
                         f"(full model), {PEFT_CONFIG} (LoRA/IA3/prompt tuning) or "
                         "ptft_adapter_config.json (bottleneck adapters).")
    base = None if kind == FULL else _base_model(model_dir, kind)
    return Target(model_dir=model_dir, run_dir=run_dir, kind=kind,
                  task=_model_task(model_dir, kind), base=base)


def _is_checkpoint(folder: Path) -> bool:
    from ptft.engine.checkpoint import COMPLETE_MARKER

    return (folder / COMPLETE_MARKER).is_file() and (folder / "state.json").is_file()


def _checkpoint_hint(path: str, folder: Path) -> str:
    """What to do with a training checkpoint given where a model is expected: resume from it
    without training further, which writes its weights as a model (final/)."""
    step = _read_json(folder / "state.json").get("step", "N")
    stage = "pretrain"
    config = folder / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf
        stage = OmegaConf.load(config).get("stage", {}).get("name", stage)
    from ptft.config.compose import override

    resume = shlex.quote(override("run.resume", folder))  # as Hydra, then the shell, read it
    return (f"{path} is a training checkpoint (step {step}), not a model directory. Write "
            f"its weights as a model by resuming from it without training further: ptft "
            f"{stage} {resume} train.max_steps={step} run.dir=NEW_DIR (with the "
            f"run's own overrides: a difference from {config} is reported); the model is "
            "then NEW_DIR/final. A finished run's own final/ needs no such step.")


def _model_kind(folder: Path) -> str | None:
    from ptft.methods import adapter

    if adapter.is_adapter_dir(folder):
        return ADAPTER
    if (folder / PEFT_CONFIG).is_file():
        return PEFT
    if (folder / "config.json").is_file():
        return FULL
    return None


def _base_model(model_dir: Path, kind: str) -> str:
    from ptft.methods import adapter

    config_file = model_dir / (adapter.CONFIG_FILE if kind == ADAPTER else PEFT_CONFIG)
    base = _read_json(config_file).get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{config_file} does not name its base model "
                         "(base_model_name_or_path); it cannot be loaded without one.")
    # A local path that is gone would otherwise be tried as a hub name, with a confusing error.
    if Path(base).is_absolute() and not Path(base).exists():
        raise UsageError(f"the base model {base} named in {config_file} does not exist any "
                         "more; restore it (the adapter only holds what training changed).")
    return base


def _model_task(model_dir: Path, kind: str) -> str:
    """classification when the model ends in a classification head, else lm."""
    if kind == FULL:
        architectures = _read_json(model_dir / "config.json").get("architectures") or []
        is_classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    elif kind == PEFT:
        is_classifier = _read_json(model_dir / PEFT_CONFIG).get("task_type") == "SEQ_CLS"
    else:  # bottleneck adapters save a classifier's head with them (it is new, so it trains)
        is_classifier = _head_rows(model_dir) is not None
    return "classification" if is_classifier else "lm"


def _head_rows(model_dir: Path) -> int | None:
    """Rows (labels) of a classification head saved in a peft/adapter directory, if any."""
    from safetensors import safe_open

    weights = model_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(str(weights), "pt") as f:
        for name in f.keys():
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in HEAD_NAMES and parts[-1] == "weight":
                return f.get_slice(name).get_shape()[0]
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {path}: {first_line(err)}") from None


def run_config(run_dir: Path) -> RootConfig:
    """The typed config a run was trained with, from its config.yaml."""
    from ptft.config.compose import to_object

    raw = load_run_yaml(run_dir)
    validate_run_config(raw, run_dir)
    return to_object(raw)


def validate_run_config(cfg, run_dir: Path) -> None:
    """validate(), naming the file: a run from an older ptft may carry keys it no longer has."""
    from ptft.config.compose import validate

    try:
        validate(cfg)
    except UsageError as err:
        raise UsageError(f"{run_dir / 'config.yaml'}: {err}") from None


def load_run_yaml(run_dir: Path):
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.load(run_dir / "config.yaml")
    except (OSError, OmegaConfBaseException, ValueError) as err:
        raise UsageError(f"cannot read {run_dir / 'config.yaml'}: {first_line(err)}") from None


def chat_by_default(target: Target) -> bool:
    """Prompts go through the chat template when the model was instruction-tuned (SFT): it
    learnt to answer after the template's assistant header, not to continue raw text."""
    if target.run_dir is None:
        return False
    from ptft.data.prepare import resolve_task

    return resolve_task(run_config(target.run_dir)) == "sft"


def trust_remote_code(target: Target) -> bool:
    """The run's choice; a directory without a run never runs shipped code."""
    return run_config(target.run_dir).model.trust_remote_code if target.run_dir else False


# ---- loading ------------------------------------------------------------------------------

def quiet_libraries() -> None:
    """No per-shard progress bars or notices for library developers in our output."""
    import warnings

    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    # Generating with prompt tuning: transformers passes position ids, peft replaces them with
    # its own (virtual tokens first) and warns every time; nothing for a user to act on.
    warnings.filterwarnings("ignore", message="Position ids are not supported", module=r"peft\.")


def load_tokenizer(target: Target):
    from ptft.data import tokenizer

    try:
        return tokenizer.load_tokenizer(target.model_dir, trust_remote_code(target))
    except (OSError, ValueError) as err:
        raise UsageError(f"could not load the tokenizer in {target.model_dir}: "
                         f"{first_line(err)}") from None


def classifier_labels(target: Target) -> list[str]:
    """The label names of a classifier, in head order.

    A full model stores them (id2label in config.json), a peft or adapter directory in
    labels.json (ptft.methods.save_final). A directory saved before labels.json existed
    has only the head's weights: its names come from the run's own training data, prepared
    as in training (from the data cache when it is still there)."""
    from ptft.methods import LABELS_FILE

    if target.kind == FULL:
        id2label = _read_json(target.model_dir / "config.json").get("id2label") or {}
        return [id2label[k] for k in sorted(id2label, key=int)]
    rows = _head_rows(target.model_dir)
    saved = target.model_dir / LABELS_FILE
    if saved.is_file():
        labels = _read_json(saved)
        if (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)
                or (rows is not None and len(labels) != rows)):
            raise UsageError(f"{saved} is not the classifier's label names: a JSON list of "
                             f"strings, one per output of its head ({rows or 'unknown'}).")
        return labels
    if target.run_dir is not None:
        from ptft.data.prepare import prepare_data

        cfg = run_config(target.run_dir)
        cfg.model.path = target.tokenizer_dir
        labels = prepare_data(cfg).labels or []
        if rows is None or len(labels) == rows:
            return labels
    if rows is None:
        raise UsageError(f"cannot tell the labels of the classifier in {target.model_dir}.")
    return [f"LABEL_{i}" for i in range(rows)]  # no run to ask: transformers' default names


def load_model(target: Target, labels: list[str] | None = None) -> torch.nn.Module:
    """The trained model in eval mode, fp32: the base with the run's changes applied.
    `labels` (classifiers) are the names of the head's outputs."""
    from ptft import models

    remote = trust_remote_code(target)
    pad_id = None
    if target.task == "classification":
        labels = classifier_labels(target) if labels is None else labels
        # The head must skip the padding of the tokenizer that inputs are encoded with.
        pad_id = load_tokenizer(target).pad_token_id
    if target.kind == FULL:
        model = models.load_model(str(target.model_dir), remote, target.task, labels, pad_id)
    else:
        base = models.load_model(target.base, remote, target.task, labels, pad_id)
        model = _apply_saved_changes(base, target)
    return model.eval()


def _apply_saved_changes(base: torch.nn.Module, target: Target) -> torch.nn.Module:
    try:
        if target.kind == PEFT:
            from peft import PeftModel
            return PeftModel.from_pretrained(base, str(target.model_dir))
        from ptft.methods import adapter
        return adapter.load(base, target.model_dir)
    except (ValueError, RuntimeError, OSError) as err:  # e.g. a directory for another base
        raise UsageError(f"could not apply {target.model_dir} to its base model "
                         f"{target.base}: {first_line(err)}") from None


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
