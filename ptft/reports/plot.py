"""`ptft plot`: train and eval loss curves of runs, as a PNG (matplotlib, the `plot` extra) or
as sparklines in the terminal."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ptft.errors import UsageError, writing_to
from ptft.reports.rundata import load_run, read_metrics, resolve_run
from ptft.reports.runs import count

X_AXES = ("step", "tokens")
X_LABELS = {"step": "optimizer step", "tokens": "training tokens seen (loss-bearing targets)"}
SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class Curves:
    """One run's loss curves against the chosen x axis."""
    label: str
    train_x: list[float] = field(default_factory=list)
    train_y: list[float] = field(default_factory=list)
    eval_x: list[float] = field(default_factory=list)
    eval_y: list[float] = field(default_factory=list)


def load_curves(run_dir: Path, label: str, x: str = "step") -> Curves:
    if x not in X_AXES:
        raise UsageError(f"--x {x}: choose one of {', '.join(X_AXES)}.")
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r.get("kind") == "train" and not r.get("nonfinite")
             and _finite(r.get("loss"))]
    evals = [r for r in rows if r.get("kind") == "eval" and _finite(r.get("eval_loss"))]
    curves = Curves(label)
    if x == "step":
        curves.train_x = [r["step"] for r in train]
        curves.eval_x = [r["step"] for r in evals]
    else:
        # Train rows carry the tokens seen so far; eval rows only their step, placed on the
        # token axis by interpolating between the train rows around it (step 0: 0 tokens).
        points = [(0, 0)] + [(r["step"], r["tokens"]) for r in train if "tokens" in r]
        curves.train_x = [r["tokens"] for r in train if "tokens" in r]
        train = [r for r in train if "tokens" in r]
        curves.eval_x = [_interp(r["step"], points) for r in evals]
    curves.train_y = [r["loss"] for r in train]
    curves.eval_y = [r["eval_loss"] for r in evals]
    return curves


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plotting a PNG needs matplotlib: pip install 'ptft[plot]' "
                         "(or draw sparklines in the terminal with --terminal).") from None
    matplotlib.use("Agg")  # files only: no display needed (a cluster node, CI, ssh)
    import matplotlib.pyplot as plt
    return plt


def draw_png(runs: list[Curves], x: str, output: Path, title: str) -> Path:
    """Two panels, train loss and eval loss, one colour per run; returns the path written."""
    plt = import_pyplot()
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    colours = plt.get_cmap("tab10").colors
    for i, curves in enumerate(runs):
        colour = colours[i % len(colours)]
        few = len(curves.train_x) <= 30  # markers, so a short (or one-point) curve shows
        ax_train.plot(curves.train_x, curves.train_y, color=colour, linewidth=1.6,
                      marker="." if few else None, markersize=6, label=curves.label)
        ax_eval.plot(curves.eval_x, curves.eval_y, color=colour, linewidth=1.6, marker="o",
                     markersize=4, label=curves.label)
    for ax, name in ((ax_train, "train loss (mean over each logging interval)"),
                     (ax_eval, "eval loss (held-out split)")):
        ax.set_title(name, fontsize=11)
        ax.set_xlabel(X_LABELS[x])
        ax.set_ylabel("cross-entropy loss (nats per token)")
        ax.grid(True, alpha=0.3)
        if x == "tokens":
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    fig.suptitle(title, fontsize=13)
    handles, labels = ax_eval.get_legend_handles_labels()
    if not handles:
        handles, labels = ax_train.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(runs), 4),
               frameon=False, fontsize=10)
    try:
        with writing_to(output):
            output.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(output, dpi=120)
    finally:
        plt.close(fig)
    return output


def sparkline_table(runs: list[Curves], x: str, width: int = 48) -> Table:
    table = Table(title="loss curves (each line scaled to its own min..max)",
                  title_justify="left", header_style="bold")
    for name, justify in (("run", "left"), ("curve", "left"), ("", "left"), ("first", "right"),
                          ("last", "right"), ("min", "right"), (x, "right")):
        table.add_column(name, justify=justify, no_wrap=name == "")
    for curves in runs:
        for name, xs, ys in (("train", curves.train_x, curves.train_y),
                             ("eval", curves.eval_x, curves.eval_y)):
            if not ys:
                table.add_row(escape(curves.label), name, "(no points)", "-", "-", "-", "-")
                continue
            span = f"{_short(xs[0])}..{_short(xs[-1])}"
            table.add_row(escape(curves.label), name, sparkline(ys, width), f"{ys[0]:.4f}",
                          f"{ys[-1]:.4f}", f"{min(ys):.4f}", span)
    return table


def sparkline(values: list[float], width: int = 48) -> str:
    """Values as block characters, averaged into at most `width` buckets."""
    if len(values) > width:
        size = len(values) / width
        values = [sum(chunk) / len(chunk) for chunk in
                  (values[int(i * size):max(int(i * size) + 1, int((i + 1) * size))]
                   for i in range(width))]
    low, high = min(values), max(values)
    if high - low < 1e-12:
        return SPARK[3] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, int((v - low) / (high - low) * len(SPARK)))]
                   for v in values)


def plot_runs(arguments: list[str], x: str = "step", output: str | None = None,
              terminal: bool = False, console: Console | None = None) -> Path | None:
    """`ptft plot`: the PNG written (its path), or None when sparklines were printed."""
    if x not in X_AXES:
        raise UsageError(f"--x {x}: choose one of {', '.join(X_AXES)}.")
    if not terminal:
        import_pyplot()
    run_dirs = [resolve_run(a) for a in arguments]
    labels = []
    for argument, run_dir in zip(arguments, run_dirs):
        method = load_run(run_dir)["method"]
        labels.append(f"{argument.rstrip('/')} ({method})" if method else argument)
    runs = [load_curves(path, label, x) for path, label in zip(run_dirs, labels)]
    if not any(c.train_y or c.eval_y for c in runs):
        raise UsageError("no loss values to plot yet: the metrics.jsonl of "
                         f"{', '.join(map(str, run_dirs))} holds no finite loss rows.")
    if terminal:
        (console or Console()).print(sparkline_table(runs, x))
        return None
    path = Path(output) if output else (run_dirs[0] / "loss.png" if len(run_dirs) == 1
                                        else Path("loss.png"))
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"--output {output}: give a file name ending in .png (or .svg, .pdf).")
    title = "Loss of " + (labels[0] if len(labels) == 1 else f"{len(labels)} runs")
    return draw_png(runs, x, path, title)


def _interp(step: float, points: list[tuple[float, float]]) -> float:
    points = sorted(points)
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        if s0 <= step <= s1:
            return t0 if s1 == s0 else t0 + (t1 - t0) * (step - s0) / (s1 - s0)
    if len(points) >= 2 and step > points[-1][0]:  # past the last train row: extrapolate
        (s0, t0), (s1, t1) = points[-2], points[-1]
        return t1 + (t1 - t0) / max(s1 - s0, 1) * (step - s1)
    return points[-1][1]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: float) -> str:
    return count(int(value)) if value >= 1000 else f"{value:g}"
