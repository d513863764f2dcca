"""`ptft compare`: full fine-tuning vs LoRA vs adapters on the same base and data.

Given run directories, it compares them. Given none, it first fine-tunes the same base model
on the same data once per method, each in its own `ptft finetune` process (so each run's peak
memory is its own: a process's peak RSS never goes down), into <output>/<method>/. Either way it
writes <output>/report.md (a Markdown table) and <output>/loss.png (train and eval loss curves,
one colour per method).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ptft.errors import (EXIT_PREEMPTED, EXIT_USAGE, Preempted, TrainingFailed, UsageError,
                         writing_to)
from ptft.reports.plot import draw_png, import_pyplot, load_curves
from ptft.reports.rundata import dir_size, load_run, read_metrics, resolve_run
from ptft.reports.runs import duration, fmt, pct, print_fitted, short_model

DEFAULT_METHODS = ("full", "lora", "adapter")
METHOD_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "adapter": "adapters",
                "ia3": "IA3", "prompt_tuning": "prompt tuning"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def split_arguments(arguments: list[str]) -> tuple[list[str], list[str]]:
    """Run directories and overrides from one list: an override has '=' or starts with + or ~;
    anything else must be a run directory."""
    runs, overrides = [], []
    for argument in arguments:
        is_override = ("=" in argument or argument.startswith(("+", "~"))) and not \
            Path(argument).is_dir()
        (overrides if is_override else runs).append(argument)
    return runs, overrides


def compare(arguments: list[str], output: str | None, methods: str,
            console: Console | None = None) -> Path:
    console = console or Console()
    run_args, overrides = split_arguments(arguments)
    import_pyplot()  # no matplotlib: say so now, not after minutes of training
    if run_args and overrides:
        raise UsageError("give either run directories to compare or overrides for new runs, "
                         f"not both (run directories: {', '.join(run_args)}; overrides: "
                         f"{' '.join(overrides)}).")
    failed: list[str] = []
    if run_args:
        run_dirs = [resolve_run(a) for a in run_args]
        out = Path(output) if output else _default_output("runs")
        commands: list[str] = []
    else:
        out, run_dirs, commands, failed = _run_methods(overrides, output, methods, console)
    report = write_report(run_dirs, out, commands)
    records = comparison_rows(run_dirs)
    print_fitted(console, lambda title, dropped: comparison_table(records, title, dropped),
                 "method comparison", ("steps", "lr", "final/ on disk", "status",
                                       "% of total", "peak memory"))
    console.print(f"report: {report}\nchart:  {out / 'loss.png'}", highlight=False)
    if failed:
        raise TrainingFailed(f"the {', '.join(failed)} run(s) did not finish (see above); the "
                             f"report shows what they reached: {report}")
    return report


def _run_methods(overrides: list[str], output: str | None, methods: str,
                 console: Console) -> tuple[Path, list[Path], list[str], list[str]]:
    from ptft.config.compose import compose, override

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    if not chosen:
        raise UsageError("--methods is empty; e.g. --methods full,lora,adapter.")
    if any(o.lstrip("+~").split("=")[0] in ("method", "run.dir", "run.name") for o in overrides):
        raise UsageError("ptft compare chooses method= and run.dir= itself: choose the methods "
                         "with --methods full,lora,adapter and the place with --output DIR.")
    if len(set(chosen)) != len(chosen):
        raise UsageError(f"--methods {methods} names a method twice.")
    # Compose every run before the first starts, so a typo fails in a second, not a minute in.
    configs = {m: compose("finetune", [f"method={m}", *overrides]) for m in chosen}
    first = configs[chosen[0]]
    out = Path(output) if output else _default_output(first.run.root)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--output {out} already holds files; choose a new folder (or pass "
                         "its run directories to compare them again).")
    base = first.model.path
    if base == "latest":  # resolved once, so every method starts from the very same model
        from ptft.models import resolve_latest
        base = resolve_latest(base, first.run.root)
    run_dirs, commands, failed = [], [], []
    for i, method in enumerate(chosen, 1):
        run_dir = out / method
        args = ["finetune", f"method={method}", *overrides, override("model.path", base),
                override("run.dir", run_dir)]
        command = "ptft " + " ".join(_quote(a) for a in args)
        commands.append(command)
        console.print(f"\n[bold]compare {i}/{len(chosen)}:[/] {escape(command)}", highlight=False)
        returncode = _run_child([sys.executable, "-m", "ptft", *args])
        if returncode == EXIT_USAGE:
            raise UsageError(f"the {method} run was refused (message above); nothing compared.")
        if returncode == EXIT_PREEMPTED:
            raise Preempted(f"the {method} run was stopped by a signal; run `ptft compare "
                            f"{' '.join(str(d) for d in [*run_dirs, run_dir])}` after resuming "
                            "it, or start the comparison again.")
        if not (run_dir / "metrics.jsonl").is_file():
            raise TrainingFailed(f"the {method} run failed before it logged anything "
                                 f"(exit {returncode}); see above.")
        if returncode != 0:
            failed.append(method)
        run_dirs.append(run_dir)
    return out, run_dirs, commands, failed


def _run_child(argv: list[str]) -> int:
    """Run one training process and return its exit code. A stop request reaches it and is
    answered the child's way (checkpoint, exit 75), not by killing it mid-save: Ctrl-C goes
    to the child from the terminal (the parent ignores it meanwhile); SIGTERM and SIGUSR1
    sent to this process are passed on."""
    child = subprocess.Popen(argv, env=os.environ.copy())
    handlers = {signal.SIGINT: signal.SIG_IGN}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        handlers[sig] = lambda signum, frame: child.send_signal(signum)
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def comparison_rows(run_dirs: list[Path]) -> list[dict]:
    records = [load_run(d) for d in run_dirs]
    methods = [r["method"] for r in records]
    for record, run_dir in zip(records, run_dirs):
        label = METHOD_NAMES.get(record["method"], record["method"] or run_dir.name)
        if methods.count(record["method"]) > 1:
            label += f" ({run_dir.name})"
        final = run_dir / "final"
        rates = sorted(r["tokens_per_s"] for r in read_metrics(run_dir / "metrics.jsonl")
                       if r.get("kind") == "train" and _finite(r.get("tokens_per_s")))
        record.update({
            "label": label,
            # The median over logged intervals: the training speed, without the start-up,
            # evaluations and saving that the run's overall tokens/s also divides by.
            "train_tokens_per_s": rates[len(rates) // 2] if rates else None,
            "final_bytes": dir_size(final),
            "weight_bytes": sum(p.stat().st_size for p in final.rglob("*")
                                if p.suffix in WEIGHT_SUFFIXES) if final.is_dir() else None,
        })
    return records


COLUMNS = ("method", "trainable params", "% of total", "peak memory", "wall time",
           "train tokens/s", "eval loss (start → end)", "{quality}", "final/ on disk",
           "weights in final/", "lr", "steps", "status")


def _cells(record: dict, classification: bool) -> list[str]:
    trainable, total = record["trainable_parameters"], record["parameters"]
    quality = (fmt(record["eval_accuracy"], "{:.3f}") if classification
               else fmt(record["eval_ppl"], "{:,.1f}"))
    return [
        record["label"],
        f"{trainable:,}" if trainable is not None else "-",
        pct(trainable, total) if trainable is not None and total else "-",
        fmt(record["peak_memory_mb"], "{:,.0f} MB"),
        duration(record["wall_s"]),
        fmt(record["train_tokens_per_s"], "{:,.0f}"),
        f"{fmt(record['first_eval_loss'], '{:.3f}')} → {fmt(record['eval_loss'], '{:.3f}')}",
        quality,
        _size(record["final_bytes"]),
        _size(record["weight_bytes"]),
        fmt(record["lr"], "{:g}"),
        fmt(record["steps"], "{:,}"),
        record["status"],
    ]


def comparison_table(records: list[dict], title: str, dropped: list[str] = ()) -> Table:
    classification = any(r["eval_accuracy"] is not None for r in records)
    table = Table(title=title, title_justify="left", header_style="bold",
                  box=box.SIMPLE_HEAD, show_edge=False)
    keep = [i for i, column in enumerate(COLUMNS) if column not in dropped]
    for i in keep:
        table.add_column(COLUMNS[i].format(quality="eval accuracy" if classification
                                           else "eval perplexity"),
                         justify="left" if COLUMNS[i] in ("method", "status") else "right")
    for record in records:
        cells = _cells(record, classification)
        table.add_row(*(escape(cells[i]) for i in keep))
    return table


def write_report(run_dirs: list[Path], out: Path, commands: list[str]) -> Path:
    records = comparison_rows(run_dirs)
    classification = any(r["eval_accuracy"] is not None for r in records)
    header = [c.format(quality="eval accuracy" if classification else "eval perplexity")
              for c in COLUMNS]
    with writing_to(out):
        out.mkdir(parents=True, exist_ok=True)
    curves = [load_curves(d, r["label"]) for d, r in zip(run_dirs, records)]
    bases = sorted({short_model(r["model"]) for r in records})
    data = sorted({r["data"] or "-" for r in records})
    draw_png(curves, "step", out / "loss.png",
             f"{' vs '.join(r['label'] for r in records)} — base {', '.join(bases)}, "
             f"data {', '.join(data)}")
    lines = [
        "# Method comparison",
        "",
        f"Base model: {', '.join(f'`{b}`' for b in bases)}. Data: {', '.join(data)}. "
        f"Written {time.strftime('%Y-%m-%d %H:%M')} by `ptft compare`.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" if c in ("method", "status") else "---:" for c in COLUMNS) + " |",
        *("| " + " | ".join(_cells(r, classification)) + " |" for r in records),
        "",
        "![train and eval loss per method](loss.png)",
        "",
        "Columns: *trainable params* are the weights the optimizer updates (% of all the "
        "model's weights); *peak memory* is the run's peak GPU memory allocated on CUDA, or "
        "its process's peak resident memory on CPU (Python, torch and the data included, so "
        "the differences between methods are small there); *wall time* covers the whole run "
        "(data, model, evaluations, saving); *train tokens/s* is the median over the logged "
        "training intervals of loss-bearing tokens per second (start-up and evaluations "
        "left out); "
        "*final/ on disk* is everything in the run's final/ folder (tokenizer included) and "
        "*weights* only its weight files: a LoRA or adapter run saves just its own weights and "
        "needs the base model to load.",
        "",
        "Runs:",
        "",
        *(f"* {r['label']}: `{d}`" for d, r in zip(run_dirs, records)),
        "",
    ]
    if commands:
        lines += ["Commands run:", "", "```", *commands, "```", ""]
    report = out / "report.md"
    with writing_to(report):
        report.write_text("\n".join(lines), encoding="utf-8")
    return report


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for size, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _default_output(root: str) -> Path:
    return Path(root).expanduser() / "compare" / time.strftime("%Y%m%d-%H%M%S")


def _quote(argument: str) -> str:
    import shlex
    return shlex.quote(argument)
