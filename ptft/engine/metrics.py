"""Where metrics go: every row the loop logs is handed to each configured logger.

The loop only calls `MetricsLog.write(row)` and `close()`; which backends receive the row is
`run.loggers`. metrics.jsonl is always written (ptft's own tools read it: `ptft runs`, `ptft
plot`, resume); the others are optional extras.

    jsonl        metrics.jsonl: one JSON object per logged step or evaluation, flushed as
                 written so a crashed or running job can be read at any time
    tensorboard  TensorBoard event files under <run dir>/tensorboard/
                 (pip install 'ptft[tensorboard]')

Another backend (W&B, MLflow, ...) is one class with `write(row)` and `close()` plus an entry in
LOGGERS (and an extra in pyproject.toml); the loop does not change. A backend's package is
imported when its logger is built, and a missing one is a UsageError before any step runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterable

from ptft.errors import UsageError, did_you_mean


class Logger:
    """One destination for metric rows. A row is a flat dict: {"kind": "train" | "eval",
    "step": int, ...numbers}; see the README's run directory section for the keys."""

    def write(self, row: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JsonlLogger(Logger):
    def __init__(self, run_dir: Path, path: Path | None = None):
        self.path = path or run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._file.write(json.dumps({k: jsonable(v) for k, v in row.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger(Logger):
    """Scalars `train/loss`, `train/lr`, `eval/loss`, `eval/ppl`, ... against the step, in
    <run dir>/tensorboard/ (`tensorboard --logdir runs/` shows every run)."""

    SKIP = ("kind", "step", "elapsed_s")

    def __init__(self, run_dir: Path):
        writer_class = _import_summary_writer()
        # A resumed run continues after the last row metrics.jsonl kept (resume truncates it to
        # the checkpoint's step); purge_step makes TensorBoard drop the older events written
        # past that step by the run that died, so the curve does not fold back on itself.
        last = _last_step(run_dir / "metrics.jsonl")
        self._writer = writer_class(log_dir=str(run_dir / "tensorboard"),
                                    purge_step=last + 1 if last is not None else None)

    def write(self, row: dict) -> None:
        kind, step = row.get("kind", "train"), row.get("step", 0)
        for key, value in row.items():
            if key in self.SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = key.removeprefix(f"{kind}_")  # eval_loss -> eval/loss
            self._writer.add_scalar(f"{kind}/{name}", value, step)
        self._writer.flush()  # readable while the run goes on, like metrics.jsonl

    def close(self) -> None:
        self._writer.close()


# name -> constructor taking the run directory. jsonl is always on.
LOGGERS: dict[str, Callable[[Path], Logger]] = {
    "jsonl": JsonlLogger,
    "tensorboard": TensorBoardLogger,
}
# What each optional backend needs, checked before a run starts.
REQUIREMENTS: dict[str, Callable[[], None]] = {
    "tensorboard": lambda: _import_summary_writer(),
}


def check_loggers(names: Iterable[str]) -> list[str]:
    """The logger names to use (jsonl first, always, once each). Raises UsageError for an
    unknown name or a backend whose package is not installed."""
    chosen = ["jsonl"]
    for name in names:
        if name not in LOGGERS:
            raise UsageError(f"unknown logger {name!r} in run.loggers.{did_you_mean(name, LOGGERS)}"
                             f" Available: {', '.join(LOGGERS)}.")
        if name not in chosen:
            chosen.append(name)
    for name in chosen:
        REQUIREMENTS.get(name, lambda: None)()
    return chosen


class MetricsLog:
    """The loop's one handle on metrics: fans each row out to the configured loggers."""

    def __init__(self, path: Path, enabled: bool = True, loggers: Iterable[str] = ("jsonl",)):
        """`path` is metrics.jsonl in the run directory; the other loggers write next to it.
        enabled=False (ranks other than 0) writes nothing: one process owns the files. The
        names are checked on every rank, so a missing package stops all of them alike."""
        self.path = path
        names = check_loggers(loggers)
        self._loggers: list[Logger] = []
        if enabled:
            for name in names:
                self._loggers.append(JsonlLogger(path.parent, path) if name == "jsonl"
                                     else LOGGERS[name](path.parent))

    def write(self, row: dict) -> None:
        for logger in self._loggers:
            logger.write(row)

    def close(self) -> None:
        for logger in self._loggers:
            logger.close()
        self._loggers = []


def _import_summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("run.loggers has tensorboard, but the tensorboard package is not "
                         "installed: pip install 'ptft[tensorboard]' (or drop it from "
                         "run.loggers).") from None
    return SummaryWriter


def _last_step(path: Path) -> int | None:
    if not path.is_file():
        return None
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    return max(steps) if steps else None


def jsonable(value):
    """`value` as JSON can hold it. JSON has no NaN/inf: they are written as strings, so
    non-finite values stay visible rather than dropped (or written as invalid bare NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
