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
                    state: dict) -> Path:
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
    return final


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
