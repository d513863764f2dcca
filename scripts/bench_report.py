"""What scripts/bench.py prints and compares: medians per (workload, precision, side), the
ratios ptft / Trainer, LoRA and adapters against full fine-tuning, bf16 against fp32."""

from __future__ import annotations

import statistics

SIDES = ("ptft", "trainer")
MEDIANS = ("target_tokens_per_s", "tokens_per_s", "padding", "peak_memory_mb", "mfu",
           "eval_loss", "time_to_first_step_s")


def summarise(runs: list[dict], workloads: list[str], precisions: list[str]) -> list[dict]:
    """Medians over repeats, per workload, precision and side; then the ratios."""
    rows = []
    for workload in workloads:
        for precision in precisions:
            for side in SIDES:
                done = [r for r in runs if r.get("ok") and (r["workload"], r["precision"],
                                                            r["side"]) == (workload, precision, side)]
                if not done:
                    continue
                row = {"workload": workload, "precision": precision, "side": side,
                       "repeats": len(done)}
                for key in MEDIANS:
                    values = [r[key] for r in done if r.get(key) is not None]
                    row[key] = statistics.median(values) if values else None
                row["step_s"] = statistics.median(r["seconds"] / r["steps"] for r in done)
                row["all_target_tokens_per_s"] = [r["target_tokens_per_s"] for r in done]
                rows.append(row)
    by_key = {(r["workload"], r["precision"], r["side"]): r for r in rows}
    for row in rows:
        workload, precision, side = row["workload"], row["precision"], row["side"]
        trainer = by_key.get((workload, precision, "trainer"))
        if side == "ptft" and trainer:
            row["ratio"] = row["target_tokens_per_s"] / trainer["target_tokens_per_s"]
        full = by_key.get(("sft", precision, side))
        if workload in ("lora", "adapter") and full:
            row["step_vs_full"] = row["step_s"] / full["step_s"]
            row["memory_vs_full"] = row["peak_memory_mb"] / full["peak_memory_mb"]
        fp32 = by_key.get((workload, "fp32", side))
        if precision != "fp32" and fp32:
            row["vs_fp32"] = row["target_tokens_per_s"] / fp32["target_tokens_per_s"]
    return rows


def table(rows: list[dict], meta: dict) -> str:
    memory = "peak GPU MB" if meta["device"].startswith("cuda") else "peak RSS MB"
    head = ["workload", "precision", "side", "target tok/s", "total tok/s", "ptft/Trainer",
            "padding", memory, "MFU", "step s", "step vs full", "memory vs full", "vs fp32",
            "eval loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["workload"], r["precision"], r["side"], fmt(r["target_tokens_per_s"], "{:,.0f}"),
            fmt(r["tokens_per_s"], "{:,.0f}"), fmt(r.get("ratio"), "{:.2f}x"),
            fmt(r["padding"], "{:.0%}"), fmt(r["peak_memory_mb"], "{:,.0f}"),
            fmt(r["mfu"], "{:.2f}"), fmt(r["step_s"], "{:.3f}"),
            fmt(r.get("step_vs_full"), "{:.2f}x"), fmt(r.get("memory_vs_full"), "{:.2f}x"),
            fmt(r.get("vs_fp32"), "{:.2f}x"), fmt(r.get("eval_loss"), "{:.3f}")]) + " |")
    lines.append("")
    if meta.get("ptft_overrides"):
        lines.append(f"ptft side with: {' '.join(meta['ptft_overrides'])}")
    peaks = ", ".join(f"{p} {fmt(v and v / 1e9, '{:,.0f}')}"
                      for p, v in meta.get("peak_flops", {}).items())
    lines.append(f"{meta['device']}, {meta['threads']} threads; peak GFLOP/s (the MFU "
                 f"denominator): {peaks}; load average {meta['load_before']} before, "
                 f"{meta.get('load_after')} after; torch {meta['torch']}, transformers "
                 f"{meta['transformers']}")
    before, after = meta.get("matmul_before") or {}, meta.get("matmul_after") or {}
    if any(before.values()):
        def gflops(value):
            return fmt(value and value / 1e9, "{:,.0f}")
        now = ", ".join(f"{p} {gflops(v)} / {gflops(after.get(p))}" for p, v in before.items())
        lines.append(f"matmul probe taken afresh, GFLOP/s before / after the runs: {now} "
                     "(below the peak when other work shares the machine: MFU falls with it)")
    return "\n".join(lines)


def comparison(before: dict, after: dict) -> str:
    """A table of the change from a previous results file (files written before the
    precision column existed count as fp32)."""
    def key(row):
        return row["workload"], row.get("precision", "fp32"), row["side"]

    # The fine-tuning workloads run --model: results of another model are another workload.
    if before.get("meta", {}).get("model") != after.get("meta", {}).get("model"):
        return (f"change against the previous results: none to show (they are of --model "
                f"{before.get('meta', {}).get('model')}, these of "
                f"{after.get('meta', {}).get('model')})")
    old = {key(r): r for r in before.get("rows", [])}
    lines = ["| workload | precision | side | target tok/s before | after | change | "
             "MFU before | after |", "|---|---|---|---|---|---|---|---|"]
    for r in after["rows"]:
        o = old.get(key(r))
        if not o:
            continue
        change = r["target_tokens_per_s"] / o["target_tokens_per_s"] - 1
        lines.append(f"| {' | '.join(key(r))} | {o['target_tokens_per_s']:,.0f} | "
                     f"{r['target_tokens_per_s']:,.0f} | {change:+.1%} | "
                     f"{fmt(o.get('mfu'), '{:.2f}')} | {fmt(r.get('mfu'), '{:.2f}')} |")
    if len(lines) == 2:
        return ("change against the previous results: none to show (no workload, precision "
                "and side in common with them)")
    settings = ("threads", "warmup", "steps", "smoke", "ptft_overrides", "device", "torch",
                "transformers")
    was, now = before.get("meta"), after.get("meta", {})
    differ = [f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in settings
              if was is not None and was.get(k) != now.get(k)]
    note = (f"\n(measured with other settings, not only other code: {'; '.join(differ)})"
            if differ else "")
    return "change against the previous results:\n" + "\n".join(lines) + note


def fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)
