"""Finding run directories and reading one back into a flat record.

A run directory is any folder with summary.json, or with metrics.jsonl and config.yaml (a run
that started before summaries existed, or whose summary was lost). The executor writes
summary.json with status "running" when the loop starts and rewrites it when the run finishes,
fails or is preempted. A run whose process was killed outright (SIGKILL, a lost node) still
says "running": that cannot be told apart from a live run reliably, so the record carries the
age of the last metrics row instead, and a stale run shows as one that has not logged for long.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import yaml

from ptft.errors import UsageError

# Folders inside a run directory that are never runs themselves.
_NOT_RUNS = {"checkpoints", "final", "tensorboard", "merged", "__pycache__"}
STATUSES = ("finished", "running", "preempted", "failed")


def is_run_dir(path: Path) -> bool:
    return (path / "summary.json").is_file() or (
        (path / "metrics.jsonl").is_file() and (path / "config.yaml").is_file())


def find_runs(root: Path) -> list[Path]:
    """Every run directory at or under `root` (not looking inside a run's own folders)."""
    if is_run_dir(root):
        return [root]
    found = []
    for current, dirnames, _ in os.walk(root):
        here = Path(current)
        if here != root and is_run_dir(here):
            found.append(here)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in _NOT_RUNS and not d.startswith("."))
    return found


def resolve_run(arg: str, root: str = "runs") -> Path:
    """A run directory named on the command line: a path, a path under `root` (as `ptft runs`
    shows it), or a run's final/ folder."""
    path = Path(arg).expanduser()
    if not path.exists() and (Path(root) / arg).exists():
        path = Path(root) / arg
    if path.name == "final" and is_run_dir(path.parent):
        path = path.parent
    if not path.exists():
        raise UsageError(f"{arg}: no such run directory. `ptft runs` lists the runs under "
                         f"{root}/.")
    if not (path / "metrics.jsonl").is_file():
        raise UsageError(f"{arg} is not a ptft run directory (no metrics.jsonl in it).")
    return path


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a line cut short (a run killed mid-write) is skipped, and
    the strings "nan"/"inf" the log writes for non-finite values become floats again."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append({k: _number(v) for k, v in row.items()})
    return rows


def load_run(path: Path, root: Path | None = None, now: float | None = None) -> dict:
    """One run as a flat record (the keys of `ptft runs --json`)."""
    now = time.time() if now is None else now
    summary = _read_json(path / "summary.json")
    config = _read_yaml(path / "config.yaml")
    rows = read_metrics(path / "metrics.jsonl")
    train = [r for r in rows if r.get("kind") == "train" and not r.get("nonfinite")
             and _finite(r.get("loss"))]
    evals = [r for r in rows if r.get("kind") == "eval"]
    last_train, last_eval = (train[-1] if train else {}), (evals[-1] if evals else {})

    def pick(key: str, *fallbacks):
        if summary.get(key) is not None:
            return summary[key]
        return next((v for v in fallbacks if v is not None), None)

    cfg = lambda *keys: _dig(config, *keys)  # noqa: E731
    metrics_file = path / "metrics.jsonl"
    last_row_time = metrics_file.stat().st_mtime if metrics_file.is_file() else None
    started = next((p.stat().st_mtime for p in (path / "config.yaml", path / "summary.json",
                                                metrics_file) if p.is_file()), None)
    steps_logged = max((r.get("step", 0) for r in rows), default=None)
    return {
        "run": _display_name(path, root),
        "path": str(path.resolve()),
        "stage": pick("stage", cfg("stage", "name")),
        "method": pick("method", cfg("method", "name")),
        "model": pick("model", cfg("model", "path"), cfg("model", "name")),
        "data": pick("data", cfg("data", "source")),
        "task": summary.get("task"),
        "status": summary.get("status") or "running",
        "steps": pick("steps", steps_logged),
        "max_steps": cfg("train", "max_steps"),
        "train_loss": pick("train_loss", last_train.get("loss")),
        "first_eval_loss": pick("first_eval_loss", evals[0].get("eval_loss") if evals else None),
        "eval_loss": pick("eval_loss", last_eval.get("eval_loss")),
        "eval_ppl": pick("eval_ppl", last_eval.get("eval_ppl")),
        "eval_accuracy": pick("eval_accuracy", last_eval.get("eval_accuracy")),
        "tokens": pick("tokens", last_train.get("tokens")),
        "tokens_per_s": pick("tokens_per_s", last_train.get("tokens_per_s")),
        "parameters": summary.get("parameters"),
        "trainable_parameters": summary.get("trainable_parameters"),
        "wall_s": pick("wall_s", next((r["elapsed_s"] for r in reversed(rows)
                                       if _finite(r.get("elapsed_s"))), None)),
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "lr": cfg("train", "lr"),
        "started": _iso(started),
        "last_metrics_at": _iso(last_row_time),
        "last_metrics_age_s": None if last_row_time is None else max(0.0, now - last_row_time),
        "reason": summary.get("reason"),
        "_started": started or 0.0,
    }


def list_runs(root: Path, stage: str | None = None, method: str | None = None) -> list[dict]:
    """Records of the runs under `root`, newest first, filtered by stage and method."""
    if not root.exists():
        raise UsageError(f"{root}: no such directory. Runs are written under runs/ by default "
                         "(run.root); pass the folder that holds them.")
    now = time.time()
    records = [load_run(p, root, now) for p in find_runs(root)]
    records = [r for r in records if (stage is None or r["stage"] == stage)
               and (method is None or r["method"] == method)]
    records.sort(key=lambda r: r["_started"], reverse=True)
    for record in records:
        del record["_started"]
    return records


def jsonable(record: dict) -> dict:
    """JSON has no NaN/inf: they are written as strings, as metrics.jsonl does."""
    return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()}


def dir_size(path: Path) -> int | None:
    """Bytes on disk under `path` (None when it does not exist)."""
    if not path.exists():
        return None
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _display_name(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            relative = path.resolve().relative_to(root.resolve())
            return str(relative) if str(relative) != "." else path.name
        except ValueError:
            pass
    return str(path)


def _number(value):
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity",
                                                    "-infinity"):
        return float(value)
    return value


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _dig(tree: dict, *keys):
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(timestamp))
