"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020 placement as an option).

A small bottleneck MLP, `x + up(act(down(x)))`, is added after the attention and/or the
feed-forward block of every layer; only the adapters (and optionally the norms and the head)
train. peft has no such method, so this is ptft's own module.

The blocks are found by module name, so any architecture works whose layer blocks are named
like `<...>.layers.3.self_attn` / `<...>.h.0.mlp`. Each adapter is a real child module of its
block (named `ptft_adapter`), so `.to()`, `state_dict()`, `parameters()`, deepcopy and
torch.compile see it; a forward hook on the block adds its output. The hook is a plain
module-level function that looks the adapter up on the module it is called for, so a
deepcopied model uses its own adapters, not the original's.

The result of training is an adapter directory, not a full model:
    adapter_model.safetensors    the trainable tensors, by parameter name
    ptft_adapter_config.json     the AdapterMethodConfig fields, the base model name, "format"
    labels.json                  a classifier's label names (written by ptft.methods.save_final)
`load(base_model, path)` rebuilds the trained model from it on a fresh copy of the base.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptft.config.schema import (  # the one definition of the method's keys
    AdapterMethodConfig, AdapterPlacement, NonLinearity)
from ptft.errors import UsageError

CONFIG_FILE = "ptft_adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = 1
ADAPTER_NAME = "ptft_adapter"

PLACEMENTS = tuple(placement.value for placement in AdapterPlacement)
NON_LINEARITIES = {NonLinearity.relu.value: nn.ReLU, NonLinearity.gelu.value: nn.GELU,
                   NonLinearity.silu.value: nn.SiLU}
HEAD_NAMES = ("lm_head", "score", "classifier")

# A module counts as "inside a layer" when a numeric component (the layer index in a
# ModuleList) comes before its own name: `model.layers.3.self_attn`, `transformer.h.0.attn`.
_IN_LAYER = re.compile(r"(^|\.)\d+\.")


class Bottleneck(nn.Module):
    """down (hidden -> bottleneck), non-linearity, up (bottleneck -> hidden); returns the
    residual delta only (the hook adds it to the block's output).

    `up` starts at zero (weight and bias), so the delta is exactly 0 and the adapted model
    computes exactly what the base model does at init. `down` keeps nn.Linear's default
    (Kaiming-uniform) init rather than a tiny normal: identity at init is already guaranteed
    by `up` alone, and up's gradient is proportional to act(down(x)); were down also tiny,
    both factors would start near zero and learning would start very slowly (the same reason
    LoRA initialises A with Kaiming and only B with zeros).
    """

    def __init__(self, hidden_size: int, bottleneck: int, non_linearity: str = "relu"):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.act = NON_LINEARITIES[non_linearity]()
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        return self.up(self.act(self.down(x.to(dtype)))).to(x.dtype)


def _adapter_hook(module: nn.Module, args, output):
    """Forward hook: replace the block's hidden states `out` with `out + adapter(out)`."""
    adapter = getattr(module, ADAPTER_NAME)
    if isinstance(output, torch.Tensor):
        return output + adapter(output)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        hidden = output[0]
        return type(output)([hidden + adapter(hidden), *output[1:]])
    raise TypeError(f"ptft adapter: the block {type(module).__name__} returned "
                    f"{type(output).__name__}; expected a tensor or a tuple whose first "
                    f"element is the hidden states")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under torch.compile (`_orig_mod`) / DDP-style (`module`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _coerce(cfg: Any) -> AdapterMethodConfig:
    """An AdapterMethodConfig from any object (e.g. the schema's dataclass) with these fields."""
    if isinstance(cfg, AdapterMethodConfig):
        values = dataclasses.asdict(cfg)
    elif isinstance(cfg, dict):
        values = dict(cfg)
    else:
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(AdapterMethodConfig)
                  if hasattr(cfg, f.name)}
    names = {f.name for f in dataclasses.fields(AdapterMethodConfig)}
    values = {k: (v.value if hasattr(v, "value") else v) for k, v in values.items() if k in names}
    return AdapterMethodConfig(**values)


def _validate(cfg: AdapterMethodConfig) -> dict[str, re.Pattern]:
    """Check the config; return the compiled regexes of the selected placement by key."""
    if cfg.placement not in PLACEMENTS:
        raise UsageError(f"method.placement: '{cfg.placement}' is not a placement; "
                         f"valid values: {', '.join(PLACEMENTS)}.")
    if cfg.non_linearity not in NON_LINEARITIES:
        raise UsageError(f"method.non_linearity: '{cfg.non_linearity}' is not supported; "
                         f"valid values: {', '.join(NON_LINEARITIES)}.")
    if isinstance(cfg.reduction_factor, bool) or not isinstance(cfg.reduction_factor, int) \
            or cfg.reduction_factor < 1:
        raise UsageError(f"method.reduction_factor must be an integer >= 1, "
                         f"got {cfg.reduction_factor!r}.")
    keys = ["attention_modules", "ffn_modules"] if cfg.placement == "houlsby" else ["ffn_modules"]
    patterns = {}
    for key in keys:
        try:
            patterns[key] = re.compile(getattr(cfg, key))
        except (re.error, TypeError) as err:
            raise UsageError(f"method.{key}: {getattr(cfg, key)!r} is not a valid regex "
                             f"({err}).") from err
    return patterns


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    candidates = [config]
    if config is not None and hasattr(config, "get_text_config"):
        candidates.append(config.get_text_config())
    for c in candidates:
        for attr in ("hidden_size", "n_embd", "d_model"):
            value = getattr(c, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    raise UsageError("method=adapter: cannot tell the model's hidden size "
                     "(model.config has no hidden_size / n_embd).")


def _find_blocks(model: nn.Module, patterns: dict[str, re.Pattern]) -> list[tuple[str, nn.Module]]:
    """Modules inside a layer whose name matches a selected regex, outermost match only."""
    matched: list[tuple[str, nn.Module]] = []
    per_key = {key: 0 for key in patterns}
    for name, module in model.named_modules():
        if not name or not _IN_LAYER.search(name) or isinstance(module, Bottleneck):
            continue
        keys = [key for key, pattern in patterns.items() if pattern.search(name)]
        if not keys:
            continue
        # e.g. GPT-2's `h.0.attn.c_attn` also ends in "attn": its ancestor `h.0.attn` is the block.
        if any(name.startswith(parent + ".") for parent, _ in matched):
            continue
        matched.append((name, module))
        for key in keys:
            per_key[key] += 1
    for key, count in per_key.items():
        if count == 0:
            raise UsageError(
                f"method.{key}: the regex {patterns[key].pattern!r} matched no module inside a "
                f"layer (a name with a layer index, like 'model.layers.0.mlp'). Set "
                f"method.attention_modules / method.ffn_modules to match this model's block names.")
    return matched


def _find_head(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Output heads by common name (lm_head / score / classifier), outside the layers."""
    heads = []
    for name, module in model.named_modules():
        if name and name.rsplit(".", 1)[-1] in HEAD_NAMES and not _IN_LAYER.search(name):
            if not any(name.startswith(parent + ".") for parent, _ in heads):
                heads.append((name, module))
    return heads


def apply(model: nn.Module, cfg, task: str = "lm") -> nn.Module:
    """Insert adapters, freeze the base, make the adapters (and norms / head if asked) train.
    A classifier's head is new and random, so for task="classification" it always trains."""
    cfg = _coerce(cfg)
    if task == "classification":
        cfg = dataclasses.replace(cfg, train_head=True)
    patterns = _validate(cfg)
    target = _unwrap(model)
    if any(isinstance(m, Bottleneck) for m in target.modules()):
        raise UsageError("method=adapter: this model already has adapters.")
    hidden = _hidden_size(target)
    bottleneck = max(1, hidden // cfg.reduction_factor)
    blocks = _find_blocks(target, patterns)
    heads = _find_head(target) if cfg.train_head else []
    if cfg.train_head and not heads:
        raise UsageError(f"method.train_head: no output head found (a module named "
                         f"{' / '.join(HEAD_NAMES)}).")

    target.requires_grad_(False)
    for _, block in blocks:
        reference = next(block.parameters(), None)
        adapter = Bottleneck(hidden, bottleneck, cfg.non_linearity)
        if reference is not None:
            adapter.to(device=reference.device, dtype=reference.dtype)
        block.add_module(ADAPTER_NAME, adapter)
        block.register_forward_hook(_adapter_hook)
        adapter.requires_grad_(True)
    if cfg.train_layer_norms:
        for module in target.modules():
            if "Norm" in type(module).__name__:
                module.requires_grad_(True)
    for _, head in heads:
        # With tied embeddings (GPT-2, many small models) lm_head.weight IS the input
        # embedding, so this trains the embedding too; that is allowed and saved under the
        # parameter's first name (e.g. transformer.wte.weight).
        head.requires_grad_(True)
    target._ptft_adapter_config = cfg
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (adapters and whatever else was made trainable), by name."""
    return {name: p for name, p in _unwrap(model).named_parameters() if p.requires_grad}


def save_final(model: nn.Module, tokenizer, path: Path, state_dict: dict | None = None) -> None:
    """Write the adapter directory (weights + config). The caller saves the tokenizer.
    `state_dict`: the whole weights of a sharded model, keyed like its named_parameters."""
    from safetensors.torch import save_file

    target = _unwrap(model)
    cfg = getattr(target, "_ptft_adapter_config", None)
    if cfg is None:
        raise ValueError("save_final: the model has no adapters (apply() was not called).")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: (p if state_dict is None else state_dict[name]).detach().to("cpu")
               .contiguous().clone() for name, p in adapter_state(target).items()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    config = getattr(target, "config", None)
    info = {**dataclasses.asdict(cfg),
            "base_model_name_or_path": getattr(config, "_name_or_path", None),
            "format": FORMAT}
    (path / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")


def is_adapter_dir(path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def load(base_model: nn.Module, path) -> nn.Module:
    """Rebuild a trained adapter model from `path` on `base_model` (modified in place)."""
    from safetensors.torch import load_file

    path = Path(path)
    info = json.loads((path / CONFIG_FILE).read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_FILE}: unsupported adapter format "
                         f"{info.get('format')!r} (this ptft reads format {FORMAT}).")
    cfg = _coerce(info)
    model = apply(base_model, cfg)
    saved = load_file(str(path / WEIGHTS_FILE))
    expected = adapter_state(model)
    unexpected = sorted(set(saved) - set(expected))
    missing = sorted(set(expected) - set(saved))
    wrong_shape = sorted(f"{n} (saved {tuple(saved[n].shape)}, model {tuple(expected[n].shape)})"
                         for n in set(saved) & set(expected)
                         if saved[n].shape != expected[n].shape)
    if unexpected or missing or wrong_shape:
        base = info.get("base_model_name_or_path")
        parts = []
        for label, names in (("saved tensors with no place in this model", unexpected),
                             ("model parameters with no saved tensor", missing),
                             ("shape mismatches", wrong_shape)):
            if names:
                more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
                parts.append(f"{len(names)} {label}: {', '.join(names[:3])}{more}")
        trained_on = f"trained on {base!r}" if base else "base model name not recorded"
        raise ValueError(f"{path}: the adapter does not fit this base model ({trained_on}); "
                         + "; ".join(parts))
    with torch.no_grad():
        for name, tensor in saved.items():
            expected[name].copy_(tensor)
    model.eval()
    return model
