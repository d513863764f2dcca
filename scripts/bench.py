"""ptft against the Hugging Face Trainer on the same work: tokens/s, padding, memory, MFU.

    python scripts/bench.py                                   # pretrain-tiny, sft, lora, adapter
    python scripts/bench.py --workloads pretrain-small --repeats 3 --output results.json
    python scripts/bench.py --compare results.json            # and print the change
    python scripts/bench.py --precision bf16                  # both sides under bf16 autocast

Each (workload, side, repeat) runs in a fresh worker process, so peak memory belongs to that
side alone; the sides alternate (ptft first on even repeats, the Trainer first on odd ones) so
that a machine getting busier or quieter does not favour one of them. Within a worker the first
--warmup steps are left out and the next --steps are timed, from the end of one optimizer step
to the end of another (data loading, forward, backward, clipping and the optimizer included).

Both sides get the same thing:
  model      the same config and initial weights (ptft's builder with the same seed, or the
             same saved base model for fine-tuning; LoRA/adapters applied by ptft's own code)
  data       the same tokens, prepared and cached by ptft: pre-training blocks; the SFT
             samples of `docstrings` (ptft packs them; the Trainer gets them one per row with
             its usual padding collator, DataCollatorForSeq2Seq: pad tokens, labels -100)
  batch      the same tokens per optimizer step (SFT: the Trainer's batch holds as many samples
             as ptft's packed rows do on average)
  optimizer  the same AdamW (ptft's builder: betas, weight-decay groups, fused kernel) and the
             same schedule (warm-up + cosine, as a LambdaLR), the same gradient clipping
  threads    torch.set_num_threads(--threads) in every worker (and OMP_NUM_THREADS)
ptft runs through its executor (checkpoints off, one evaluation batch at the start and end,
outside the timed window) and its tokens/s and MFU come from its own metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOADS = {
    # name: (stage, overrides); fine-tuning starts from a saved, randomly initialised base
    "pretrain-tiny": ("pretrain", ["model=llama-tiny"]),
    "pretrain-small": ("pretrain", ["model=llama-small", "train.batch_size=8"]),
    # for GPUs (run with --precision bf16)
    "pretrain-gpt2": ("pretrain", ["model=gpt2-124m", "train.batch_size=16",
                                   "train.seq_len=1024"]),
    "pretrain-1b": ("pretrain", ["model=llama-1b", "train.batch_size=4", "train.seq_len=2048"]),
    "sft": ("finetune", ["method=full"]),
    "lora": ("finetune", ["method=lora"]),
    "adapter": ("finetune", ["method=adapter"]),
}
DEFAULT_WORKLOADS = ["pretrain-tiny", "sft", "lora", "adapter"]
# --smoke: a 2-layer, hidden-32 model on a few documents, a handful of steps (for tests).
SMOKE_MODEL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
               "model.num_kv_heads=null", "model.intermediate_size=64", "model.vocab_size=320"]
SMOKE_PRETRAIN = ["train.seq_len=32", "train.batch_size=4", "data.max_documents=24",
                  "data.eval_fraction=0.1"]
SMOKE_FINETUNE = ["train.seq_len=128", "train.batch_size=2"]
SIDES = ("ptft", "trainer")


# ---- the parent: plan, run workers, report -------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        return _worker(json.loads(Path(args.worker).read_text()))
    workloads = args.workloads.split(",") if args.workloads else (
        ["pretrain-tiny"] if args.smoke else DEFAULT_WORKLOADS)
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        print(f"error: unknown workload {unknown}; choose from {', '.join(WORKLOADS)}",
              file=sys.stderr)
        return 2
    if args.smoke:
        args.warmup, args.steps, args.repeats = 1, min(args.steps, 2), 1
    args.warmup = max(1, args.warmup)  # the timed window starts at the end of a step
    sides = [s for s in SIDES if s in args.sides.split(",")]
    threads = args.threads or _default_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)

    import torch

    torch.set_num_threads(threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ptft-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    meta = _machine(threads, args)
    print(f"ptft bench: {', '.join(workloads)}; {args.repeats} repeat(s) x (warm-up "
          f"{args.warmup} + {args.steps} timed steps) per side; {meta['device']}, "
          f"{threads} threads, {args.precision}; load average {meta['load_before']}",
          flush=True)
    base = _base_model(workdir, args) if any(WORKLOADS[w][0] == "finetune"
                                              for w in workloads) else None
    meta["peak_flops"] = _peak(args.precision)
    runs: list[dict] = []
    for repeat in range(args.repeats):
        for workload in workloads:
            order = sides if repeat % 2 == 0 else sides[::-1]
            for side in order:
                spec = {"workload": workload, "side": side, "repeat": repeat,
                        "overrides": _overrides(workload, args, base, workdir, side, repeat),
                        "stage": WORKLOADS[workload][0], "warmup": args.warmup,
                        "steps": args.steps, "threads": threads,
                        "precision": args.precision, "peak_flops": meta["peak_flops"]}
                result = _run_worker(spec, workdir, args.timeout)
                runs.append(result)
                print(f"  {workload:<14} {side:<8} repeat {repeat}: "
                      + (f"{result['target_tokens_per_s']:,.0f} target tok/s, "
                         f"mfu {_fmt(result.get('mfu'), '{:.3f}')}" if result.get("ok")
                         else f"FAILED: {result.get('error')}"), flush=True)
    meta["load_after"] = _load_average()
    rows = _summarise(runs, workloads)
    print()
    print(_table(rows, meta))
    results = {"meta": meta, "rows": rows, "runs": runs}
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
        print(f"\nresults written to {args.output}")
    if args.compare:
        print()
        print(_comparison(json.loads(Path(args.compare).read_text()), results))
    return 0 if all(r.get("ok") for r in runs) else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", help=f"comma-separated, from: {', '.join(WORKLOADS)} "
                                       f"(default: {','.join(DEFAULT_WORKLOADS)})")
    p.add_argument("--model", default="llama-tiny",
                   help="base model shape for sft/lora/adapter (a model= option)")
    p.add_argument("--repeats", type=int, default=2, help="worker runs per side and workload")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of a run")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="both sides: fp32, or bf16 autocast with fp32 weights")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--compare", help="a previous --output file: print the change")
    p.add_argument("--workdir", help="scratch folder (default: a new temporary folder)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per worker run")
    p.add_argument("--sides", default="ptft,trainer",
                   help="which sides to run: ptft,trainer (default), ptft or trainer")
    p.add_argument("--ptft-override", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra override for ptft's side only, to measure an option "
                        "(e.g. train.compile=true); repeatable")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, tiny data, 1 repeat of 1 + 2 steps: checks the harness")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def _default_threads() -> int:
    import torch
    return torch.get_num_threads()


def _overrides(workload: str, args, base: str | None, workdir: Path, side: str,
               repeat: int) -> list[str]:
    stage, extra = WORKLOADS[workload]
    run_dir = workdir / "runs" / f"{workload}-{side}-{repeat}"
    common = [f"train.max_steps={args.warmup + args.steps}", "train.log_every=1",
              "train.eval_every=1000000000", "train.save_every=0", "train.eval_batches=1",
              f"train.precision={args.precision}", f"run.dir={run_dir}", "run.resume=never"]
    if stage == "finetune":
        extra = extra + [f"model.path={base}"] + (SMOKE_FINETUNE if args.smoke else [])
    elif args.smoke:
        extra = extra + SMOKE_MODEL + SMOKE_PRETRAIN
    return extra + common + (args.ptft_override if side == "ptft" else [])


def _base_model(workdir: Path, args) -> str:
    """A randomly initialised model of --model's shape with ptft's tokenizer, saved once: the
    start of every fine-tuning workload (throughput does not depend on the weights)."""
    from ptft.config.compose import compose, to_object
    from ptft.data.prepare import prepare_data
    from ptft.models import build_model

    overrides = [f"model={args.model}"] + (SMOKE_MODEL + SMOKE_PRETRAIN if args.smoke else [])
    cfg = to_object(compose("pretrain", overrides))
    path = workdir / f"base-{args.model}{'-smoke' if args.smoke else ''}"
    if not (path / "config.json").is_file():
        tokenizer = prepare_data(cfg).tokenizer
        model = build_model(cfg.model, tokenizer.bos_token_id, tokenizer.eos_token_id,
                            tokenizer.pad_token_id, cfg.train.seed)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


def _peak(precision: str) -> float | None:
    """The peak FLOP/s both sides' MFU is measured against (ptft's own, cached probe)."""
    import torch

    from ptft.engine.flops import device_peak_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device_peak_flops(device, torch.bfloat16 if precision == "bf16" else None)


def _run_worker(spec: dict, workdir: Path, timeout: int) -> dict:
    name = f"{spec['workload']}-{spec['side']}-{spec['repeat']}"
    spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec["result_path"] = str(out_path)
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]),
           "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**_spec_keys(spec), "ok": False, "error": f"timed out after {timeout} s"}
    if proc.returncode != 0 or not out_path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {**_spec_keys(spec), "ok": False,
                "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return {**_spec_keys(spec), "ok": True, **json.loads(out_path.read_text())}


def _spec_keys(spec: dict) -> dict:
    return {k: spec[k] for k in ("workload", "side", "repeat")}


# ---- a worker: one side of one workload ----------------------------------------------------

def _worker(spec: dict) -> int:
    import torch

    torch.set_num_threads(spec["threads"])
    from ptft.config.compose import compose, to_object

    cfg = to_object(compose(spec["stage"], spec["overrides"]))
    result = _run_ptft(cfg, spec) if spec["side"] == "ptft" else _run_trainer(cfg, spec)
    result["peak_memory_mb"] = _peak_memory_mb()
    Path(spec["result_path"]).write_text(json.dumps(result))
    return 0


def _run_ptft(cfg, spec: dict) -> dict:
    from rich.console import Console

    from ptft.engine.executor import execute

    summary = execute(cfg, Console(quiet=True))
    rows = [json.loads(line) for line in
            (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if r.get("kind") == "train"}
    first, last = spec["warmup"], spec["warmup"] + spec["steps"]
    window = [train[s] for s in range(first + 1, last + 1)]
    seconds = train[last]["elapsed_s"] - train[first]["elapsed_s"]
    step_times = [(r["tokens"] - train[r["step"] - 1]["tokens"] if r["step"] > 1 else
                   r["tokens"]) / r["tokens_per_s"] for r in window]
    mfus = [r.get("mfu") for r in window]
    reported_mfu = (sum(m * t for m, t in zip(mfus, step_times)) / sum(step_times)
                    if all(m is not None for m in mfus) else None)
    counts = _ptft_counts(cfg, first, last)
    return {"seconds": seconds, "steps": spec["steps"],
            "target_tokens_per_s": (train[last]["tokens"] - train[first]["tokens"]) / seconds,
            "tokens_per_s": counts["tokens"] / seconds,
            "padding": 1 - counts["tokens"] / counts["positions"],
            "mfu": reported_mfu, "eval_loss": summary.get("eval_loss"),
            "train_loss": train[last]["loss"],
            "time_to_first_step_s": summary.get("time_to_first_step_s")}


def _ptft_counts(cfg, first: int, last: int) -> dict:
    """Input tokens (padding excluded) and computed positions of ptft's timed steps: the same
    batches its executor drew (same sampler, same seed)."""
    import numpy as np

    from ptft.data.batches import TrainStream
    from ptft.data.prepare import prepare_data

    data = prepare_data(cfg)
    t = cfg.train
    stream = TrainStream(data.train, t.batch_size, t.seed)
    tokens = positions = 0
    lengths = np.diff(data.train.offsets) - 1 if hasattr(data.train, "sequences") else None
    for step in range(last):
        for _ in range(t.grad_accum):
            indices = stream.sampler.next_batch()
            if step < first:
                continue
            if hasattr(data.train, "sequences"):  # packed SFT rows
                rows = [int(sum(lengths[i] for i in data.train.sequences[k])) for k in indices]
                tokens += sum(rows)
                positions += len(rows) * max(rows)
            else:  # pre-training blocks: every position is a token
                tokens += len(indices) * t.seq_len
                positions += len(indices) * t.seq_len
    return {"tokens": tokens, "positions": positions}


def _run_trainer(cfg, spec: dict) -> dict:
    import numpy as np
    import torch
    from transformers import (DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments, default_data_collator)

    from ptft.data.prepare import prepare_data
    from ptft.engine.executor import _model, _quiet_libraries, _seed_everything
    from ptft.engine.flops import TrainingFlops, mfu, training_flops
    from ptft.engine.optim import build_optimizer, lr_at
    from ptft.methods import apply_method

    _quiet_libraries()
    t = cfg.train
    _seed_everything(t.seed)
    data = prepare_data(cfg)
    model = apply_method(_model(cfg, data), cfg.method, data.task)  # ptft's init, same seed
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    total_steps = spec["warmup"] + spec["steps"]

    if hasattr(data.train, "sequences"):  # SFT: one sample per row, padded per batch
        tokens, flags, offsets = data.train.tokens, data.train.flags, data.train.offsets
        samples = [(int(offsets[i]), int(offsets[i + 1])) for i in range(len(offsets) - 1)]
        dataset = [{"input_ids": tokens[s:e].astype(np.int64).tolist(),
                    "labels": np.where(flags[s:e], tokens[s:e].astype(np.int64), -100).tolist()}
                   for s, e in samples]
        # As many samples per batch as ptft's packed rows hold on average: same tokens/step.
        per_row = (offsets[-1] - len(samples)) / len(data.train)
        mean_len = float(np.mean([e - s for s, e in samples]))
        batch_size = max(1, round(t.batch_size * per_row / mean_len))
        collate = DataCollatorForSeq2Seq(data.tokenizer, padding=True, label_pad_token_id=-100,
                                         return_tensors="pt")
    else:  # pre-training: the same fixed blocks; labels = input_ids (the model shifts them)
        blocks = data.train
        dataset = [{"input_ids": torch.from_numpy(blocks.tokens[i * t.seq_len:(i + 1) * t.seq_len]
                                                  .astype(np.int64))}
                   for i in range(len(blocks))]
        for item in dataset:
            item["labels"] = item["input_ids"]
        batch_size = t.batch_size
        collate = default_data_collator

    batches: list[dict] = []

    def counting_collate(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        batches.append({"positions": batch["input_ids"].numel(),
                        "tokens": int(mask.sum()) if mask is not None
                        else batch["input_ids"].numel(),
                        "targets": int((batch["labels"][:, 1:] != -100).sum())})
        return batch

    ends: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            ends[state.global_step] = time.perf_counter()

    optimizer = build_optimizer(model.to(device), t, device)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, t, total_steps) / t.lr)
    args = TrainingArguments(
        output_dir=str(Path(cfg.run.dir) / "trainer"), max_steps=total_steps,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=t.grad_accum,
        max_grad_norm=t.grad_clip or 0.0, seed=t.seed, data_seed=t.seed,
        bf16=spec["precision"] == "bf16", use_cpu=device.type == "cpu",
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
        remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=counting_collate, optimizers=(optimizer, schedule),
                      callbacks=[Clock()])
    trainer.train()

    first, last = spec["warmup"], total_steps
    seconds = ends[last] - ends[first]
    window = batches[first * t.grad_accum:last * t.grad_accum]
    tokens = sum(b["tokens"] for b in window)
    targets = sum(b["targets"] for b in window)
    positions = sum(b["positions"] for b in window)
    flops: TrainingFlops = training_flops(model, t.seq_len)
    return {"seconds": seconds, "steps": spec["steps"], "batch_size": batch_size,
            "target_tokens_per_s": targets / seconds, "tokens_per_s": tokens / seconds,
            "padding": 1 - tokens / positions,
            "mfu": mfu(1 / seconds, flops.step(tokens, targets), spec["peak_flops"])}


def _peak_memory_mb() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---- report --------------------------------------------------------------------------------

def _summarise(runs: list[dict], workloads: list[str]) -> list[dict]:
    """Medians over repeats, per workload and side; ratios ptft / Trainer and vs full."""
    rows = []
    for workload in workloads:
        for side in SIDES:
            done = [r for r in runs if r["workload"] == workload and r["side"] == side
                    and r.get("ok")]
            if not done:
                continue
            row = {"workload": workload, "side": side, "repeats": len(done)}
            for key in ("target_tokens_per_s", "tokens_per_s", "padding", "peak_memory_mb",
                        "mfu", "eval_loss", "time_to_first_step_s"):
                values = [r[key] for r in done if r.get(key) is not None]
                row[key] = statistics.median(values) if values else None
            row["step_s"] = statistics.median(r["seconds"] / r["steps"] for r in done)
            row["all_target_tokens_per_s"] = [r["target_tokens_per_s"] for r in done]
            rows.append(row)
    by_key = {(r["workload"], r["side"]): r for r in rows}
    for row in rows:
        trainer = by_key.get((row["workload"], "trainer"))
        if row["side"] == "ptft" and trainer:
            row["ratio"] = row["target_tokens_per_s"] / trainer["target_tokens_per_s"]
        full = by_key.get(("sft", row["side"]))
        if row["workload"] in ("lora", "adapter") and full:
            row["step_vs_full"] = row["step_s"] / full["step_s"]
            row["memory_vs_full"] = row["peak_memory_mb"] / full["peak_memory_mb"]
    return rows


def _table(rows: list[dict], meta: dict) -> str:
    memory = "peak GPU MB" if meta["device"].startswith("cuda") else "peak RSS MB"
    head = ["workload", "side", "target tok/s", "total tok/s", "ptft/Trainer", "padding",
            memory, "MFU", "step s", "step vs full", "eval loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["workload"], r["side"], _fmt(r["target_tokens_per_s"], "{:,.0f}"),
            _fmt(r["tokens_per_s"], "{:,.0f}"), _fmt(r.get("ratio"), "{:.2f}x"),
            _fmt(r["padding"], "{:.0%}"), _fmt(r["peak_memory_mb"], "{:,.0f}"),
            _fmt(r["mfu"], "{:.2f}"), _fmt(r["step_s"], "{:.3f}"),
            _fmt(r.get("step_vs_full"), "{:.2f}x"), _fmt(r.get("eval_loss"), "{:.3f}")]) + " |")
    peak = meta.get("peak_flops")
    lines.append("")
    if meta.get("ptft_overrides"):
        lines.append(f"ptft side with: {' '.join(meta['ptft_overrides'])}")
    lines.append(f"{meta['device']}, {meta['threads']} threads, {meta['precision']}; peak "
                 f"{_fmt(peak and peak / 1e9, '{:,.0f}')} GFLOP/s (MFU denominator); load "
                 f"average {meta['load_before']} before, {meta.get('load_after')} after; "
                 f"torch {meta['torch']}, transformers {meta['transformers']}")
    return "\n".join(lines)


def _comparison(before: dict, after: dict) -> str:
    old = {(r["workload"], r["side"]): r for r in before.get("rows", [])}
    lines = ["| workload | side | target tok/s before | after | change | MFU before | after |",
             "|---|---|---|---|---|---|---|"]
    for r in after["rows"]:
        o = old.get((r["workload"], r["side"]))
        if not o:
            continue
        change = r["target_tokens_per_s"] / o["target_tokens_per_s"] - 1
        lines.append(f"| {r['workload']} | {r['side']} | {o['target_tokens_per_s']:,.0f} | "
                     f"{r['target_tokens_per_s']:,.0f} | {change:+.1%} | "
                     f"{_fmt(o.get('mfu'), '{:.2f}')} | {_fmt(r.get('mfu'), '{:.2f}')} |")
    return "change against the previous results:\n" + "\n".join(lines)


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _machine(threads: int, args) -> dict:
    import torch
    import transformers

    from ptft.engine.flops import _cpu_model

    device = (f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available()
              else f"cpu ({_cpu_model()}, {os.cpu_count()} cores)")
    return {"device": device, "threads": threads, "precision": args.precision,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "load_before": _load_average(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "warmup": args.warmup,
            "steps": args.steps, "repeats": args.repeats, "model": args.model,
            "smoke": args.smoke, "ptft_overrides": args.ptft_override}


if __name__ == "__main__":
    sys.exit(main())
