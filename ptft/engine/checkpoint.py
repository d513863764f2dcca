"""Checkpoints: everything needed to continue a run, never half-written, never pickled.

checkpoints/step-000100/
    model.safetensors      trainable weights
    optimizer.safetensors  optimizer state tensors; optimizer.json holds its hyper-parameters
    rng.safetensors        torch CPU/CUDA generator states
    state.json             step, tokens seen, data position, python/numpy RNG, anything else
    COMPLETE               written last: only a folder with this marker is loadable

A checkpoint is written under a temporary name, flushed, then renamed into place, so a run
killed mid-save leaves the previous checkpoint intact and the partial one is ignored.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

COMPLETE_MARKER = "COMPLETE"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, config_yaml: str, keep_last: int | None = None) -> Path:
    """Write a complete checkpoint for `step` atomically, then rotate old ones (only after
    the new one is complete, so a failed save never costs the previous checkpoint)."""
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), tmp / "model.safetensors")
    tensors, hyper = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, tmp / "optimizer.safetensors")
    _write_json(tmp / "optimizer.json", hyper)
    save_file(_torch_rng_state(), tmp / "rng.safetensors")
    _write_json(tmp / "state.json", {**state, "step": step, "rng": _host_rng_state()})
    (tmp / "config.yaml").write_text(config_yaml)  # what this state belongs to
    _write_json(tmp / COMPLETE_MARKER, {"step": step})
    _fsync_dir(tmp)
    if final.exists():  # a previous attempt at this very step that completed: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if keep_last:
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# Pickle can run code when loaded: a checkpoint holding such files is refused, not read.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model weights and optimizer state from `path`; return state.json (whose
    RNG states the caller restores with restore_rng, last, right before training goes on)."""
    pickled = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise ValueError(f"{path} holds pickled files ({', '.join(pickled)}); ptft only loads "
                         "safetensors and JSON, since unpickling can run arbitrary code.")
    weights = load_file(str(path / "model.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(set(trainable_state(model)) - set(weights))
    unknown = sorted(set(weights) - set(params))
    if missing or unknown:
        raise ValueError(f"{path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unknown[:5]}.")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    hyper = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")),
                                                   hyper))
    state = json.loads((path / "state.json").read_text())
    state["torch_rng"] = load_file(str(path / "rng.safetensors"))
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["rng"]["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch_rng"]["torch_cpu"])
    cuda = [state["torch_rng"][k] for k in sorted(state["torch_rng"]) if k.startswith("torch_cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def remove_partial_checkpoints(root: Path) -> list[str]:
    """Delete leftovers of saves that were killed midway; return their names."""
    if not root.is_dir():
        return []
    partial = [p for p in root.iterdir() if p.is_dir() and (
        p.name.startswith(".") or not (p / COMPLETE_MARKER).is_file())]
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in partial]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights by name; tied weights are stored once (safetensors refuses
    shared storage)."""
    seen: set[int] = set()
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            state[name] = param.detach().contiguous().cpu()
    return state


def complete_checkpoints(root: Path) -> list[Path]:
    """Loadable checkpoints in step order (partial ones have no COMPLETE marker)."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], hyper: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in hyper["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": hyper["param_groups"]}


def _torch_rng_state() -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"torch_cuda.{i}"] = s
    return states


def _host_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Flush every file in `path`, then the directory entry itself, to stable storage."""
    for child in path.iterdir():
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
