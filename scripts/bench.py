"""ptft against the Hugging Face Trainer on the same work: tokens/s, padding, memory, MFU.

    python scripts/bench.py                                   # pretrain-tiny, sft, lora, adapter
    python scripts/bench.py --workloads pretrain-small --repeats 3 --output results.json
    python scripts/bench.py --compare results.json            # and print the change
    python scripts/bench.py --precision bf16                  # both sides under bf16 autocast
    python scripts/bench.py --precision fp32,bf16             # each workload at both: the gain

Each (workload, precision, side, repeat) runs in a fresh worker process, so peak memory belongs to that
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

This file plans the runs and prints the report; bench_sides.py holds the two workers and
bench_report.py the table and the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its siblings, run from anywhere
from bench_report import SIDES, comparison, fmt, summarise, table  # noqa: E402

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
PRECISIONS = ("fp32", "bf16")


# ---- the parent: plan, run workers, report -------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        from bench_sides import run_worker
        return run_worker(json.loads(Path(args.worker).read_text()))
    workloads = args.workloads.split(",") if args.workloads else (
        ["pretrain-tiny"] if args.smoke else DEFAULT_WORKLOADS)
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        print(f"error: unknown workload {unknown}; choose from {', '.join(WORKLOADS)}",
              file=sys.stderr)
        return 2
    precisions = args.precision.split(",")
    if any(p not in PRECISIONS for p in precisions):
        print(f"error: --precision takes {' or '.join(PRECISIONS)}, or both: fp32,bf16",
              file=sys.stderr)
        return 2
    if args.compare and not Path(args.compare).is_file():  # say so now, not after the runs
        print(f"error: --compare {args.compare}: no such results file (write one with "
              "--output)", file=sys.stderr)
        return 2
    # Read now: --output may name the same file, and would replace it before the comparison.
    previous = json.loads(Path(args.compare).read_text()) if args.compare else None
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
          f"{threads} threads, {', '.join(precisions)}; load average {meta['load_before']}",
          flush=True)
    if "bf16" in precisions and not torch.cuda.is_available():
        from ptft.engine.device import emulated_bf16_warning

        if slow := emulated_bf16_warning(torch.bfloat16, torch.device("cpu")):
            print(f"warning: --precision bf16: {slow}", flush=True)
    base = _base_model(workdir, args) if any(WORKLOADS[w][0] == "finetune"
                                              for w in workloads) else None
    _prepare_every_workload(workloads, args, base, workdir)
    # The probe first: on a quiet machine a reading above the cached peak raises it, so no run
    # of this invocation is measured against a peak taken in a slower minute.
    meta["matmul_before"] = {p: _matmul_now(p) for p in precisions}
    meta["peak_flops"] = {p: _peak(p) for p in precisions}
    runs: list[dict] = []
    for repeat in range(args.repeats):
        for workload in workloads:
            for precision in precisions:
                order = sides if repeat % 2 == 0 else sides[::-1]
                for side in order:
                    spec = {"workload": workload, "side": side, "repeat": repeat,
                            "precision": precision, "stage": WORKLOADS[workload][0],
                            "overrides": _overrides(workload, args, base, workdir, side, repeat,
                                                    precision),
                            "warmup": args.warmup, "steps": args.steps, "threads": threads,
                            "peak_flops": meta["peak_flops"][precision]}
                    result = _run_worker(spec, workdir, args.timeout)
                    runs.append(result)
                    print(f"  {workload:<14} {precision} {side:<8} repeat {repeat}: "
                          + (f"{result['target_tokens_per_s']:,.0f} target tok/s, "
                             f"mfu {fmt(result.get('mfu'), '{:.3f}')}" if result.get("ok")
                             else f"FAILED: {result.get('error')}"), flush=True)
    meta["load_after"] = _load_average()
    meta["matmul_after"] = {p: _matmul_now(p) for p in precisions}
    rows = summarise(runs, workloads, precisions)
    print()
    print(table(rows, meta))
    results = {"meta": meta, "rows": rows, "runs": runs}
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
        print(f"\nresults written to {args.output}")
    if previous is not None:
        print()
        print(comparison(previous, results))
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
    p.add_argument("--precision", default="fp32",
                   help="both sides: fp32, bf16 (autocast, fp32 weights), or fp32,bf16 to run "
                        "every workload at each and show the gain")
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
               repeat: int, precision: str) -> list[str]:
    stage, extra = WORKLOADS[workload]
    run_dir = workdir / "runs" / f"{workload}-{precision}-{side}-{repeat}"
    common = [f"train.max_steps={args.warmup + args.steps}", "train.log_every=1",
              "train.eval_every=1000000000", "train.save_every=0", "train.eval_batches=1",
              f"train.precision={precision}", f"run.dir={run_dir}", "run.resume=never"]
    if stage == "finetune":
        extra = extra + [f"model.path={base}"] + (SMOKE_FINETUNE if args.smoke else [])
    elif args.smoke:
        extra = extra + SMOKE_MODEL + SMOKE_PRETRAIN
    return extra + common + (args.ptft_override if side == "ptft" else [])


def _prepare_every_workload(workloads: list[str], args, base: str | None,
                            workdir: Path) -> None:
    """Tokenise each workload's data here, once, so that every worker finds it cached: a
    cold preparation would cost the first worker its time to first step and ~170 MB of peak
    RSS that the others do not pay (ptft's side first, on even repeats)."""
    from ptft.config.compose import compose, to_object
    from ptft.data.prepare import prepare_data

    for workload in workloads:
        overrides = _overrides(workload, args, base, workdir, "trainer", 0, "fp32")
        prepare_data(to_object(compose(WORKLOADS[workload][0], overrides)))


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


def _matmul_now(precision: str) -> float | None:
    """The CPU's matmul FLOP/s right now (the probe behind the peak, taken afresh; where the
    cores are quiet a reading above the cached peak raises it). On a shared machine the matmul
    rate at the time of a run can be well below the peak, and every MFU of the run with it.
    None on a GPU."""
    import torch

    from ptft.engine.flops import cpu_peak_dtype, remeasure_cpu_matmul_rates

    if torch.cuda.is_available():
        return None
    dtype = cpu_peak_dtype(torch.bfloat16 if precision == "bf16" else torch.float32)
    return max(remeasure_cpu_matmul_rates(dtype).values())


def _run_worker(spec: dict, workdir: Path, timeout: int) -> dict:
    name = f"{spec['workload']}-{spec['precision']}-{spec['side']}-{spec['repeat']}"
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
    return {k: spec[k] for k in ("workload", "precision", "side", "repeat")}


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
    return {"device": device, "threads": threads, "precision": args.precision.split(","),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "load_before": _load_average(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "warmup": args.warmup,
            "steps": args.steps, "repeats": args.repeats, "model": args.model,
            "smoke": args.smoke, "ptft_overrides": args.ptft_override}


if __name__ == "__main__":
    sys.exit(main())
