"""scripts/bench.py: a smoke run of the harness (both sides, table, JSON) and its comparison."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("ptft_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_prints_the_table_and_writes_both_sides(tmp_path, cache_dir):
    output = tmp_path / "results.json"
    env = {**os.environ, "PTFT_CACHE_DIR": str(cache_dir), "PTFT_PEAK_FLOPS": "1e11"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--threads", "1",
                           "--workdir", str(tmp_path / "work"), "--output", str(output)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| workload | precision | side | target tok/s | total tok/s | ptft/Trainer |" \
        in proc.stdout
    assert "| pretrain-tiny | fp32 | ptft |" in proc.stdout
    assert "| pretrain-tiny | fp32 | trainer |" in proc.stdout
    results = json.loads(output.read_text())
    runs = {r["side"]: r for r in results["runs"]}
    assert set(runs) == {"ptft", "trainer"} and all(r["ok"] for r in runs.values())
    for run in runs.values():
        assert run["target_tokens_per_s"] > 0 and run["peak_memory_mb"] > 0
        assert 0 < run["mfu"] < 1  # against the 1e11 FLOP/s peak given above
        assert run["padding"] == 0  # pre-training blocks: no padding on either side
    ptft_row = next(r for r in results["rows"] if r["side"] == "ptft")
    assert ptft_row["ratio"] > 0 and results["meta"]["peak_flops"] == {"fp32": 1e11}
    # the machine's matmul rate at the time, next to the (given or cached) peak
    meta = results["meta"]
    assert meta["matmul_before"]["fp32"] > 1e8 and meta["matmul_after"]["fp32"] > 1e8
    assert "matmul probe taken afresh, GFLOP/s before / after the runs: fp32 " in proc.stdout


def test_compare_prints_the_change():
    bench = _bench_module()
    row = {"workload": "sft", "side": "ptft", "target_tokens_per_s": 100.0, "mfu": 0.5}
    after = {**row, "precision": "fp32", "target_tokens_per_s": 150.0}
    # a file from before the precision column counts as fp32
    text = bench.comparison({"rows": [row]}, {"rows": [after]})
    assert "| sft | fp32 | ptft | 100 | 150 | +50.0% | 0.50 | 0.50 |" in text
    other = {**after, "workload": "lora"}
    assert "none to show" in bench.comparison({"rows": [row]}, {"rows": [other]})


def test_compare_keeps_to_like_for_like():
    bench = _bench_module()
    row = {"workload": "sft", "side": "ptft", "precision": "fp32",
           "target_tokens_per_s": 100.0, "mfu": 0.5}
    meta = {"model": "llama-tiny", "threads": 2, "steps": 8}
    other_model = bench.comparison({"meta": {**meta, "model": "llama-small"}, "rows": [row]},
                                   {"meta": meta, "rows": [row]})
    assert "none to show" in other_model and "llama-small" in other_model
    other_threads = bench.comparison({"meta": {**meta, "threads": 1}, "rows": [row]},
                                     {"meta": meta, "rows": [row]})
    assert "+0.0%" in other_threads and "threads 1 -> 2" in other_threads


def test_missing_compare_file_is_a_usage_error_before_any_run(tmp_path, capsys):
    missing = tmp_path / "last.json"
    assert _bench_module().main(["--smoke", "--compare", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_summary_has_the_ratios_against_the_trainer_full_fine_tuning_and_fp32():
    bench = _bench_module()
    runs = [{"ok": True, "workload": w, "precision": p, "side": side, "seconds": seconds,
             "steps": 1, "target_tokens_per_s": 1000 / seconds, "peak_memory_mb": memory}
            for w, p, side, seconds, memory in [
                ("sft", "fp32", "ptft", 2.0, 100), ("sft", "fp32", "trainer", 8.0, 300),
                ("lora", "fp32", "ptft", 1.0, 80), ("sft", "bf16", "ptft", 1.0, 90)]]
    rows = {(r["workload"], r["precision"], r["side"]): r
            for r in bench.summarise(runs, ["sft", "lora"], ["fp32", "bf16"])}
    assert rows["sft", "fp32", "ptft"]["ratio"] == 4.0
    assert rows["lora", "fp32", "ptft"]["step_vs_full"] == 0.5
    assert rows["lora", "fp32", "ptft"]["memory_vs_full"] == 0.8
    assert rows["sft", "bf16", "ptft"]["vs_fp32"] == 2.0
    assert "ratio" not in rows["sft", "bf16", "ptft"]  # no Trainer run at bf16


def test_unknown_precision_is_a_usage_error(capsys):
    assert _bench_module().main(["--precision", "fp8"]) == 2
    assert "--precision" in capsys.readouterr().err


def test_unknown_workload_is_a_usage_error(capsys):
    assert _bench_module().main(["--workloads", "pretrain-huge"]) == 2
    assert "unknown workload" in capsys.readouterr().err
