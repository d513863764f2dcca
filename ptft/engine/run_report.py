"""What a run tells its user besides the metrics: the line describing its data, summary.json
(rewritten whole at each change of status, so a reader never sees half of it) and the summary
table printed at the end."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from ptft.engine.distributed import World
from ptft.engine.metrics import jsonable


def write_summary(run_dir: Path, summary: dict, world: World) -> None:
    """summary.json, written by rank 0 under a temporary name and renamed over the old one."""
    if not world.is_main:
        return
    tmp = run_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps({k: jsonable(v) for k, v in summary.items()}, indent=2))
    tmp.replace(run_dir / "summary.json")


def data_line(data) -> str:
    """One line: the data's sizes, what was dropped, and whether the tokenizer and the tokens
    came from the cache."""
    meta = data.meta
    if "documents" in meta:  # pre-training
        sizes = (f"{meta['train_tokens']:,} train tokens ({meta['documents']['train']} documents), "
                 f"{meta['eval_tokens']:,} eval tokens ({meta['documents']['eval']} documents)")
    else:
        tr, ev = meta["train"], meta["eval"]
        sizes = (f"{tr['samples']:,} train samples ({tr['tokens']:,} tokens, {len(data.train):,} "
                 f"sequences), {ev['samples']:,} eval samples")
        dropped = {k: tr[k] + ev[k] for k in ("truncated", "dropped_overlong", "dropped_all_masked",
                                              "unknown_label") if k in tr and tr[k] + ev[k]}
        if dropped:
            sizes += "; " + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in dropped.items())
        if data.labels:
            sizes += f"; {len(data.labels)} labels"
    return (f"data: {sizes}; tokenizer {'from cache' if data.tokenizer_cached else 'trained'}, "
            f"tokens {'from cache' if data.tokens_cached else 'prepared'} ({data.tokens_dir})")


def summary_table(summary: dict) -> Table:
    """summary.json as the table printed at the end of a run."""
    table = Table(title="run summary", show_header=False)
    fmt = {"train_loss": "{:.4f}", "eval_loss": "{:.4f}", "first_eval_loss": "{:.4f}",
           "eval_ppl": "{:.2f}", "eval_accuracy": "{:.3f}", "wall_s": "{:.1f}",
           "peak_memory_mb": "{:,.0f}", "tokens_per_s": "{:,.0f}", "parameters": "{:,}",
           "trainable_parameters": "{:,}", "tokens": "{:,}", "mfu": "{:.3f}",
           "time_to_first_step_s": "{:.1f}", "data_prep_s": "{:.2f}", "flops_per_token": "{:.4g}",
           "peak_flops": "{:.4g}"}
    for key, value in summary.items():
        text = fmt.get(key, "{}").format(value) if value is not None else "-"
        table.add_row(key, text)
    return table
