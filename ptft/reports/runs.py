"""`ptft runs`: the runs under a folder as a table (or JSON), newest first."""

from __future__ import annotations

import json
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from ptft.reports.rundata import jsonable, list_runs

STATUS_STYLE = {"finished": "green", "running": "yellow", "preempted": "magenta",
                "failed": "red"}


def show_runs(root: str, stage: str | None, method: str | None, as_json: bool,
              console: Console | None = None) -> list[dict]:
    records = list_runs(Path(root), stage, method)
    if as_json:
        print(json.dumps([jsonable(r) for r in records], indent=2))
        return records
    console = console or Console()
    if not records:
        filters = " ".join(f"{k}={v}" for k, v in (("stage", stage), ("method", method)) if v)
        console.print(f"no runs under {root}/" + (f" with {filters}" if filters else "")
                      + ". Start one with `ptft pretrain`.", highlight=False)
        return records
    print_fitted(console, lambda title, dropped: runs_table(records, title, dropped),
                 f"runs under {root}/ (newest first)", DROP_ORDER)
    return records


def print_fitted(console: Console, make, title: str, drop_order: tuple[str, ...]) -> None:
    """Print the table `make(title, dropped_columns)` builds. On a terminal too narrow for
    it, leave out columns in `drop_order` (saying so) rather than fold every cell; to a file
    or a pipe, print whole lines however wide (--json is the format for scripts)."""
    table = make(title, [])
    if not console.is_terminal:
        Console(width=max(80, _width(console, table)), file=console.file).print(table)
        return
    dropped: list[str] = []
    for column in drop_order:
        if _width(console, table) <= console.width:
            break
        dropped.append(column)
        table = make(f"{title}; left out for width: {', '.join(dropped)}", dropped)
    console.print(table)


COLUMNS = (("run", "left"), ("stage", "left"), ("method", "left"), ("model", "left"),
           ("data", "left"), ("steps", "right"), ("train loss", "right"),
           ("eval loss", "right"), ("ppl/acc", "right"), ("tok/s", "right"),
           ("trainable", "right"), ("wall", "right"), ("status", "left"),
           ("updated", "right"))
DROP_ORDER = ("data", "trainable", "tok/s", "model", "stage", "train loss", "wall")


def runs_table(records: list[dict], title: str, dropped: list[str] = ()) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD,
                  show_edge=False)
    keep = [i for i, (name, _) in enumerate(COLUMNS) if name not in dropped]
    for i in keep:
        name, justify = COLUMNS[i]
        table.add_column(name, justify=justify, overflow="fold")
    for r in records:
        cells = _row(r)
        table.add_row(*(cells[i] for i in keep))
    return table


def _width(console: Console, table: Table) -> int:
    """The width the table takes when nothing is folded."""
    return Measurement.get(console, console.options.update(max_width=10_000), table).maximum


def _row(r: dict) -> list[str]:
    steps = fmt(r["steps"], "{:,}")
    if r["status"] != "finished" and r["max_steps"] and r["steps"] is not None:
        steps = f"{r['steps']:,}/{r['max_steps']:,}"
    quality = ("acc " + fmt(r["eval_accuracy"], "{:.3f}") if r["eval_accuracy"] is not None
               else "ppl " + fmt(r["eval_ppl"], "{:,.1f}") if r["eval_ppl"] is not None
               else "-")
    trainable = "-"
    if r["trainable_parameters"] is not None:
        trainable = count(r["trainable_parameters"])
        if r["parameters"]:
            trainable += f" ({pct(r['trainable_parameters'], r['parameters'])})"
    status = r["status"]
    return [escape(r["run"]), r["stage"] or "-", r["method"] or "-",
            escape(short_model(r["model"])), escape(r["data"] or "-"), steps,
            fmt(r["train_loss"], "{:.4f}"), fmt(r["eval_loss"], "{:.4f}"), quality,
            fmt(r["tokens_per_s"], "{:,.0f}"), trainable, duration(r["wall_s"]),
            f"[{STATUS_STYLE.get(status, 'white')}]{escape(status)}[/]",
            age(r["last_metrics_age_s"])]


def fmt(value, pattern: str) -> str:
    if value is None:
        return "-"
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


def count(n: int) -> str:
    """2,134,784 -> 2.13M; 30,880 -> 30.9K."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def pct(part: float, whole: float) -> str:
    share = 100 * part / whole
    return f"{share:.0f}%" if share >= 10 else f"{share:.2g}%"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def short_model(model: str | None) -> str:
    """A base model given as a path (fine-tuning) shown as the run it came from."""
    if not model:
        return "-"
    path = Path(model)
    if not path.is_absolute():
        return model
    if path.name == "final":
        path = path.parent
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(Path(*path.parts[-3:]))
