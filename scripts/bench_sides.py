"""The two sides of scripts/bench.py, each run in a fresh worker process: ptft through its
executor, and the Hugging Face Trainer given the same model, tokens, batch and optimizer.
Each returns the timed window's figures (tokens/s, padding, MFU; peak memory is added by
run_worker)."""

from __future__ import annotations

import json
import time
from pathlib import Path


def run_worker(spec: dict) -> int:
    """Run one side of one workload as `spec` says; write its figures to spec['result_path']."""
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
        # A stored sample of n tokens is n - 1 inputs (and targets) in either side's batches.
        per_row = (offsets[-1] - len(samples)) / len(data.train)
        mean_inputs = float(np.mean([e - s for s, e in samples])) - 1
        batch_size = max(1, round(t.batch_size * per_row / mean_inputs))
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
        rows, width = batch["input_ids"].shape
        batches.append({"positions": rows * width,
                        "tokens": int(mask.sum()) if mask is not None else rows * width,
                        "targets": int((batch["labels"][:, 1:] != -100).sum()),
                        # attention credited as in ptft's count: each row without its padding
                        "attended": int((mask.sum(dim=1) ** 2).sum()) if mask is not None
                        else rows * width ** 2})
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
    attended = sum(b["attended"] for b in window)
    flops: TrainingFlops = training_flops(model, t.seq_len)
    return {"seconds": seconds, "steps": spec["steps"], "batch_size": batch_size,
            "target_tokens_per_s": targets / seconds, "tokens_per_s": tokens / seconds,
            "padding": 1 - tokens / positions,
            "mfu": mfu(1 / seconds, flops.step(tokens, targets, attended), spec["peak_flops"])}


def _peak_memory_mb() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
