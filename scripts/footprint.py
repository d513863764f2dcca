"""What ptft costs besides training: start-up time, repeated data preparation, and memory that
must not grow with the corpus.

    python scripts/footprint.py                      # all three checks
    python scripts/footprint.py --checks startup     # startup, data-prep, corpus-memory
    python scripts/footprint.py --output footprint.json

startup        `ptft --help` and `ptft config` against `python -c "import torch"` (the CLI
               must not import torch/transformers to answer either): medians of --repeats runs.
data-prep      `ptft pretrain` twice on the default data with an empty cache; each summary's
               data_prep_s (corpus reading, tokenizer training, tokenisation: the first run;
               opening the cached arrays: the second).
corpus-memory  `ptft pretrain` on the standard library's source code (data=python-code): all of
               it, and the first tenth of it, the same steps on each; peak RSS of the second,
               cache-hit run of each (so preparing the data is not part of it): token blocks
               are memory-mapped, so the larger corpus must not raise it.

Every run is the real CLI in a fresh process, with a fresh cache folder under --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECKS = ("startup", "data-prep", "corpus-memory")
# The corpus-memory runs: the same model and steps on both corpora.
MEMORY_RUN = ["model=llama-tiny", "train.max_steps=40", "train.eval_every=20",
              "train.save_every=0", "train.log_every=10"]
# The large corpus is all of python-code (the 731 modules of CPython 3.11's standard library,
# 12 M characters); the small one its first 59 modules, a tenth of the characters.
SMALL_DOCUMENTS = 59
# --smoke: a 2-layer, hidden-32 model on a few documents (checks the script, measures nothing).
SMOKE = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
         "model.num_kv_heads=null", "model.intermediate_size=64", "model.vocab_size=320",
         "train.seq_len=32", "train.batch_size=4", "train.eval_batches=2"]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    checks = args.checks.split(",")
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        print(f"error: unknown check {unknown}; choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    if args.smoke:
        args.repeats, args.small_documents = 1, 3
    args.extra = SMOKE + ["data.max_documents=24"] if args.smoke else []
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ptft-footprint-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_before": _load()}
    for check in checks:
        print(f"{check} ...", flush=True)
        results[check] = {"startup": startup, "data-prep": data_prep,
                          "corpus-memory": corpus_memory}[check](args, workdir / check)
        print(json.dumps(results[check], indent=2), flush=True)
    results["load_after"] = _load()
    print()
    print(report(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
        print(f"\nresults written to {args.output}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checks", default=",".join(CHECKS), help="comma-separated: "
                   + ", ".join(CHECKS))
    p.add_argument("--repeats", type=int, default=5, help="start-up runs per command")
    p.add_argument("--small-documents", type=int, default=SMALL_DOCUMENTS,
                   help="documents of the small corpus (the large one: all of python-code; "
                        "with --smoke, 10x)")
    p.add_argument("--workdir", help="scratch folder (default: a new temporary folder)")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, a few documents, one start-up run: checks the script")
    return p


# ---- the checks ----------------------------------------------------------------------------

def startup(args, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    ptft = [sys.executable, "-m", "ptft"]
    commands = {"python -c 'import torch'": [sys.executable, "-c", "import torch"],
                "ptft --help": [*ptft, "--help"], "ptft config": [*ptft, "config"]}
    times = {name: _median_seconds(cmd, args.repeats, workdir) for name, cmd in commands.items()}
    torch_s = times["python -c 'import torch'"]
    return {"seconds": times, "help_vs_import_torch": times["ptft --help"] / torch_s,
            "config_vs_import_torch": times["ptft config"] / torch_s}


def data_prep(args, workdir: Path) -> dict:
    cache = workdir / "cache"
    runs = [_pretrain(workdir, cache, f"run-{i}", ["train.max_steps=2", "train.eval_every=2",
                                                   "train.save_every=0", *args.extra])
            for i in (1, 2)]
    first, second = runs
    return {"first": first, "second": second,
            "second_vs_first_prep": second["data_prep_s"] / first["data_prep_s"],
            "second_prep_vs_first_wall": second["data_prep_s"] / first["wall_s"]}


def corpus_memory(args, workdir: Path) -> dict:
    result = {}
    large = 10 * args.small_documents if args.smoke else None
    for name, documents in (("small", args.small_documents), ("large", large)):
        cache = workdir / f"cache-{name}"
        extra = ["data=python-code", *MEMORY_RUN, *args.extra[:-1],  # not data.max_documents
                 f"data.max_documents={'null' if documents is None else documents}"]
        prepared = _pretrain(workdir, cache, f"{name}-prepare", extra)  # builds the cache
        cached = _pretrain(workdir, cache, f"{name}-cached", extra)
        result[name] = {"documents": documents, "train_tokens": _train_tokens(cache),
                        "prepare_run_peak_rss_mb": prepared["peak_memory_mb"],
                        "peak_rss_mb": cached["peak_memory_mb"],
                        "tokens_per_s": cached["tokens_per_s"]}
    small, large = result["small"], result["large"]
    result["token_ratio"] = large["train_tokens"] / small["train_tokens"]
    result["rss_change"] = large["peak_rss_mb"] / small["peak_rss_mb"] - 1
    return result


# ---- helpers -------------------------------------------------------------------------------

def _median_seconds(command: list[str], repeats: int, cwd: Path) -> float:
    subprocess.run(command, cwd=cwd, capture_output=True, check=True)  # warm the file cache
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, cwd=cwd, capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _pretrain(workdir: Path, cache: Path, name: str, overrides: list[str]) -> dict:
    run_dir = workdir / "runs" / name
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PTFT_CACHE_DIR": str(cache)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ptft", "pretrain", *overrides,
                           f"run.dir={run_dir}", "run.resume=never"],
                          cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ptft pretrain {' '.join(overrides)} failed ({proc.returncode}):\n"
                         + (proc.stderr or proc.stdout)[-2000:])
    summary = json.loads((run_dir / "summary.json").read_text())
    keys = ("data_prep_s", "wall_s", "peak_memory_mb", "tokens_per_s", "time_to_first_step_s")
    return {**{k: summary.get(k) for k in keys},
            "process_s": time.perf_counter() - started}


def _train_tokens(cache: Path) -> int:
    return sum(json.loads(meta.read_text()).get("train_tokens", 0)
               for meta in (cache / "tokens").glob("*/meta.json"))


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def report(results: dict) -> str:
    lines = [f"load average {results['load_before']} before, {results['load_after']} after"]
    if "startup" in results:
        s = results["startup"]
        lines += [f"{name}: {seconds:.3f} s" for name, seconds in s["seconds"].items()]
        lines.append(f"ptft --help / import torch = {s['help_vs_import_torch']:.0%}; "
                     f"ptft config / import torch = {s['config_vs_import_torch']:.0%}")
    if "data-prep" in results:
        d = results["data-prep"]
        lines.append(f"data preparation: first run {d['first']['data_prep_s']:.2f} s (of "
                     f"{d['first']['wall_s']:.1f} s), second {d['second']['data_prep_s']:.3f} s "
                     f"= {d['second_vs_first_prep']:.1%} of the first's")
    if "corpus-memory" in results:
        m = results["corpus-memory"]
        for name in ("small", "large"):
            r = m[name]
            lines.append(f"{name} corpus: {r['documents'] or 'all'} documents, {r['train_tokens']:,} "
                         f"training tokens; peak RSS {r['peak_rss_mb']:,.0f} MB (cache-hit "
                         f"run), {r['prepare_run_peak_rss_mb']:,.0f} MB while preparing")
        lines.append(f"{m['token_ratio']:.1f}x the tokens: peak RSS {m['rss_change']:+.1%}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
