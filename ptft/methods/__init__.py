"""Training methods: what part of a model trains and how the result is saved.

Each method module has apply(model, cfg, task) (before training) and save_final(model,
tokenizer, path, state_dict) (after); the training loop is the same for all of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ptft.methods import adapter, full, peft_methods

# Label names of a peft/adapter classifier, in head order, next to its weights in final/.
LABELS_FILE = "labels.json"

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
    labels = classifier_labels(model)
    if labels is not None and cfg.name != "full":
        # A full model keeps its label names in config.json (id2label); peft and adapter
        # directories have no place for them, and without them the names would have to be
        # rebuilt from the training data, which may have changed or moved since.
        (Path(path) / LABELS_FILE).write_text(json.dumps(labels, indent=2) + "\n")


def classifier_labels(model: torch.nn.Module) -> list[str] | None:
    """The label names of a sequence classifier's head, in order (None: not a classifier)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    if not type(base).__name__.endswith("ForSequenceClassification"):
        return None
    id2label = base.config.id2label
    return [id2label[i] for i in range(len(id2label))]
