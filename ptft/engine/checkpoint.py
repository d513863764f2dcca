"""Checkpoints: everything needed to continue a run, never half-written, never pickled.

checkpoints/step-000100/
    model.safetensors      trainable weights (whole, also when training was sharded)
    optimizer.safetensors  optimizer state tensors; optimizer.json holds its hyper-parameters
    rng-rank{R}.safetensors, state-rank{R}.json   each process's RNG states
    state.json             step, tokens seen, data position, interval sums, world size
    config.yaml            the config the state belongs to
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

from ptft.errors import UsageError

COMPLETE_MARKER = "COMPLETE"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, config_yaml: str, keep_last: int | None = None,
                    world=None) -> Path:
    """Write a complete checkpoint for `step` atomically, then rotate old ones (only after
    the new one is complete, so a failed save never costs the previous checkpoint).

    Called on every rank: weights and optimizer state are gathered whole (whatever the
    wrapping: none, DDP or FSDP) and written by rank 0; each rank writes its own RNG state."""
    from ptft.engine.distributed import World

    world = world or World()
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp"
    weights, optim = _full_state(model, optimizer)
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    save_file(_torch_rng_state(), tmp / f"rng-rank{world.rank}.safetensors")
    _write_json(tmp / f"state-rank{world.rank}.json", {"rng": _host_rng_state()})
    if world.is_main:
        save_file(weights, tmp / "model.safetensors")
        tensors, hyper = _flatten_optimizer(optim)
        save_file(tensors, tmp / "optimizer.safetensors")
        _write_json(tmp / "optimizer.json", hyper)
        _write_json(tmp / "state.json", {**state, "step": step, "world_size": world.world_size})
        (tmp / "config.yaml").write_text(config_yaml)  # what this state belongs to
    world.barrier()
    if world.is_main:
        _write_json(tmp / COMPLETE_MARKER, {"step": step})
        _fsync_dir(tmp)
        # A complete checkpoint of this very step (an earlier attempt at it) is moved aside,
        # not deleted, until the new one has its name: a crash in between leaves a complete
        # hidden copy that remove_partial_checkpoints puts back.
        aside = root / f".{final.name}.replaced"
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
        os.rename(tmp, final)
        _fsync_dir(root, files=False)
        shutil.rmtree(aside, ignore_errors=True)
        if keep_last:
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Trainable weights and optimizer state as whole CPU tensors keyed by parameter name,
    the same for a plain, DDP-wrapped or FSDP-sharded model (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    names = set(trainable_state_names(model))
    weights = {k: v.detach().contiguous() for k, v in
               get_model_state_dict(model, options=options).items() if k in names}
    return weights, get_optimizer_state_dict(model, optimizer, options=options)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as CPU tensors on rank 0 (others get an empty dict), for
    saving final/ from a DDP or FSDP run. A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def trainable_state_names(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters, without wrapper prefixes; tied weights once."""
    raw = getattr(model, "module", model)  # DDP keeps the model as .module
    return [n.replace("_orig_mod.", "") for n, p in raw.named_parameters() if p.requires_grad]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights by name, as CPU tensors (a plain model's; see _full_state)."""
    raw = getattr(model, "module", model)
    return {n.replace("_orig_mod.", ""): p.detach().contiguous().cpu()
            for n, p in raw.named_parameters() if p.requires_grad}


# Pickle can run code when loaded: a checkpoint holding such files is refused, not read.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    world=None) -> dict:
    """Restore model weights and optimizer state from `path` (every rank reads the whole
    files; FSDP keeps its shard of them); return state.json with this rank's RNG states, which
    the caller restores with restore_rng, last, right before training goes on."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from ptft.engine.distributed import World

    world = world or World()
    pickled = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise UsageError(f"{path} holds pickled files ({', '.join(pickled)}); ptft only loads "
                         "safetensors and JSON, since unpickling can run arbitrary code.")
    state = json.loads((path / "state.json").read_text())
    if state.get("world_size", 1) != world.world_size:
        raise UsageError(f"{path} was written by {state.get('world_size', 1)} processes; this "
                         f"run has {world.world_size}. Resume with the same number of processes.")
    weights = load_file(str(path / "model.safetensors"))
    expected = set(trainable_state_names(model))
    missing, unknown = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unknown:
        raise UsageError(f"{path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unknown[:5]}. Resume with the model and method it was "
                         "written with, or start a new run.dir.")
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    hyper = json.loads((path / "optimizer.json").read_text())
    set_optimizer_state_dict(model, optimizer, _unflatten_optimizer(
        load_file(str(path / "optimizer.safetensors")), hyper), options=options)
    state["rng"] = json.loads((path / f"state-rank{world.rank}.json").read_text())["rng"]
    state["torch_rng"] = load_file(str(path / f"rng-rank{world.rank}.safetensors"))
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
    """Delete leftovers of saves that were killed midway; return their names. A hidden copy
    that is complete (.step-N.tmp or .step-N.replaced, killed between two renames) becomes
    step-N again when step-N is missing."""
    if not root.is_dir():
        return []
    for hidden in sorted(root.glob(".step-*")):
        name = hidden.name[1:].split(".")[0]
        if (hidden / COMPLETE_MARKER).is_file() and not (root / name).exists():
            os.rename(hidden, root / name)
    partial = [p for p in root.iterdir() if p.is_dir() and (
        p.name.startswith(".") or not (p / COMPLETE_MARKER).is_file())]
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in partial]


def complete_checkpoints(root: Path) -> list[Path]:
    """Loadable checkpoints in step order (partial ones have no COMPLETE marker)."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as safetensors-ready tensors plus JSON for the rest. Keys are
    parameter names or indices; '/' separates them because names contain dots."""
    tensors, scalars = {}, {}
    for param, entry in state_dict["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{param}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{param}/{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], hyper: dict) -> dict:
    state: dict = {}
    for flat, value in [*tensors.items(), *hyper["scalars"].items()]:
        param, name = flat.rsplit("/", 1)
        state.setdefault(int(param) if param.isdigit() else param, {})[name] = value
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


def _fsync_dir(path: Path, files: bool = True) -> None:
    """Flush every file in `path`, then the directory entry itself, to stable storage."""
    for child in path.iterdir() if files else ():
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
