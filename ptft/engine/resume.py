"""Deciding whether and from where a run resumes, and that the checkpoint fits the config.

A checkpoint carries the config it was written under. Keys that shape the model, the data
or the optimisation problem must match (a resumed run must continue the same run); keys that
only change cadence or length (max steps, eval/save/log cadence, loggers) may differ and are
reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ptft.engine.checkpoint import PICKLE_SUFFIXES, complete_checkpoints, remove_partial_checkpoints
from ptft.errors import UsageError

# Keys that may change when resuming: they change how long or how often, not what is trained.
SAFE_TO_CHANGE = {
    "train.max_steps", "train.epochs", "train.eval_every", "train.eval_batches",
    "train.save_every", "train.log_every", "train.max_nonfinite_skips", "train.on_nonfinite",
    "train.device", "train.precision", "run.resume", "run.keep_last", "run.dir", "run.root",
    "run.name", "run.loggers", "data.cache_dir",
}


def find_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, per run.resume (auto | never | a path), or None."""
    root = run_dir / "checkpoints"
    if resume not in ("auto", "never"):
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise UsageError(f"run.resume={resume}: no such checkpoint directory.")
        if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
            raise UsageError(f"run.resume={resume} holds pickled files; ptft only loads "
                             "safetensors and JSON checkpoints (unpickling can run code).")
        if not (path / "COMPLETE").is_file():
            raise UsageError(f"run.resume={resume} is not a complete ptft checkpoint (no "
                             "COMPLETE marker): it was cut short or is not one.")
        step = json.loads((path / "COMPLETE").read_text()).get("step", 0)
        newer = [p.name for p in complete_checkpoints(root) if int(p.name.split("-")[1]) > step]
        if newer:
            # They belong to the run that went on from there: a later run.resume=auto would
            # pick them up, and keep_last would rotate two histories into one.
            raise UsageError(f"run.resume={resume} branches off at step {step}, but {root} "
                             f"already holds later checkpoints ({', '.join(newer)}); resume "
                             "into another run.dir, or delete them.")
        return path
    removed = remove_partial_checkpoints(root)  # first: it puts back a complete hidden copy
    existing = complete_checkpoints(root)
    if resume == "never" and existing:
        raise UsageError(f"{run_dir} already holds checkpoints and run.resume=never; choose "
                         "another run.dir, or set run.resume=auto to continue it.")
    if removed:
        print(f"removed unfinished checkpoint saves: {', '.join(removed)}")
    return existing[-1] if existing and resume == "auto" else None


def compare_configs(saved: dict, current: dict) -> list[str]:
    """The safe differences between a checkpoint's config and the current one; UsageError
    listing the unsafe ones."""
    old, new = _flatten(saved), _flatten(current)
    # A key that did not exist when the checkpoint was written counts as unchanged while it
    # holds its default: upgrading ptft must not make old runs unresumable.
    defaults = _flatten(_schema_defaults(current))
    for key in new.keys() - old.keys():
        if key in defaults and new[key] == defaults[key]:
            old[key] = new[key]
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    unsafe = [k for k in changed if k not in SAFE_TO_CHANGE]
    if unsafe:
        lines = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in unsafe)
        raise UsageError(f"cannot resume: the config differs from the checkpoint's in {lines}. "
                         "Use the original values, or start a new run (another run.dir).")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed if k != "run.resume"]


def _schema_defaults(current: dict) -> dict:
    """The schema's default values for the blocks of `current` (stage and method by name)."""
    from omegaconf import OmegaConf

    from ptft.config.compose import schema_tree

    stub = OmegaConf.create({"stage": {"name": current["stage"]["name"]},
                             "method": {"name": current["method"]["name"]}})
    return OmegaConf.to_container(schema_tree(stub), enum_to_str=True)


def checkpoint_config(path: Path) -> dict:
    return yaml.safe_load((path / "config.yaml").read_text())


def checkpoint_onednn_route(path: Path | None) -> bool | None:
    """Whether the run saved in checkpoint `path` sent its fp32 projections through oneDNN
    (None: no checkpoint, or one saved before ptft recorded it). A resumed run takes the same
    library, so that it continues the same loss curve to the bit: where oneDNN and MKL run at
    about one rate (an AVX2 Zen 3), a fresh probe could decide either way."""
    if path is None:
        return None
    return json.loads((path / "state.json").read_text()).get("onednn_linears")


def continue_from(checkpoint: Path | None, model, optimizer, sampler, state: dict,
                  total_steps: int, metrics_path: Path, world, console) -> list[dict]:
    """Put the run where `checkpoint` left it (weights, optimizer, data position, `state`,
    RNG) and return the metric rows written up to there; with no checkpoint, set aside the
    metrics of an earlier attempt and return none."""
    from ptft.engine.checkpoint import load_checkpoint, restore_rng

    if checkpoint is None:
        if world.is_main:
            set_aside_stale_metrics(metrics_path, console)
        return []
    loaded = load_checkpoint(checkpoint, model, optimizer, world)
    if loaded["step"] > total_steps:
        raise UsageError(f"{checkpoint} is at step {loaded['step']}, past this run's "
                         f"{total_steps} steps; raise train.max_steps (or train.epochs), or "
                         "start a new run.dir.")
    sampler.load_state_dict(loaded["sampler"])
    if loaded.get("data_key", state["data_key"]) != state["data_key"]:
        # Files edited, added or touched since (or a ptft that prepares them differently): the
        # saved position now points into other data. Said, not refused: a corpus copied to
        # another file system changes its stamps without changing its text.
        console.print("[yellow]warning:[/] the training data differs from the checkpoint's "
                      "(its files or their preparation changed): the run goes on from the "
                      "saved position in the data as it is now.", highlight=False)
    state.update({k: loaded[k] for k in state if k in loaded and k != "data_key"})
    kept = truncate_metrics(metrics_path, state["step"]) if world.is_main else []
    restore_rng(loaded)  # last: nothing between here and the loop may draw random numbers
    return kept


def truncate_metrics(path: Path, step: int) -> list[dict]:
    """Drop metric rows after `step`, so a resumed run continues metrics.jsonl without
    duplicate steps (rows past the checkpoint were written by the run that died); return the
    rows kept. A line cut short by the crash is dropped too."""
    if not path.is_file():
        return []
    kept: list[tuple[str, dict]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append((line, row))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line, _ in kept), encoding="utf-8")
    tmp.replace(path)
    return [row for _, row in kept]


def set_aside_stale_metrics(path: Path, console) -> None:
    """A run that starts from step 0 in a run.dir that already has metrics (a run that died
    before its first checkpoint, or ran without any) must not append to them: the rows would
    repeat its steps. They are kept next to it, not deleted."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    aside = path.with_name("metrics.previous.jsonl")
    path.replace(aside)
    console.print(f"{path.parent} has no checkpoint to resume from: starting at step 0 "
                  f"(the earlier metrics are in {aside.name})", highlight=False)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
