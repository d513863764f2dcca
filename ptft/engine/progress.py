"""Progress for people and for batch logs: a rich bar on a terminal, otherwise one plain
line per logged step (a SLURM log is not a terminal, and a bar there is noise)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn


class ProgressReporter:
    def __init__(self, total_steps: int, console: Console, start_step: int = 0):
        self.total, self.console = total_steps, console
        self.interactive = console.is_terminal and sys.stdout.isatty()
        self._bar = None
        if self.interactive:
            self._bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=console, transient=False)
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step,
                                            status="")
            self._bar.start()

    def step(self, step: int) -> None:
        if self._bar:
            self._bar.update(self._task, completed=step)

    def log(self, row: dict) -> None:
        """Show a logged training row: the bar's status, or a plain line."""
        status = (f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                  f"{row['tokens_per_s']:,.0f} tok/s")
        if self._bar:
            self._bar.update(self._task, status=status)
        else:
            self.console.print(f"step {row['step']:>6}/{self.total}  {status}  "
                               f"elapsed {row['elapsed_s']:.0f}s", highlight=False)

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def close(self) -> None:
        if self._bar:
            self._bar.stop()
