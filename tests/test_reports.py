"""`ptft runs`, `ptft plot`, `ptft compare` and `ptft config --sources`, through the real CLI on
tiny runs: one finished, one failed (non-finite), one preempted (SIGTERM), and a fine-tuning
comparison of full, LoRA and adapters."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, run_ptft

# Fine-tuning on the embedded docstrings SFT data, as small as still shows a loss curve.
TINY_SFT = ["data=docstrings", "data.max_documents=60", "data.eval_fraction=0.3",
            "train.seq_len=256", "train.batch_size=4", "train.max_steps=4", "train.eval_every=2",
            "train.save_every=0", "train.log_every=1", "train.eval_batches=2",
            "train.warmup_steps=1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# One thread per training process: on tiny models a second OpenMP thread gains nothing, and
# on a busy 2-core machine its barrier waits make steps several times slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _popen(args: list[str], cwd: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "PTFT_CACHE_DIR": str(cache), "COLUMNS": "200", **ONE_THREAD}
    return subprocess.Popen([sys.executable, "-m", "ptft", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, cache_dir):
    """runs/pretrain/{base,failed,preempted}: started together, each ending its own way."""
    work = tmp_path_factory.mktemp("reports")
    # Tokenizer and token cache first, so the three runs below do not race to build them.
    warm = run_ptft("pretrain", *TINY, "run.name=base", "train.save_every=0", cwd=work,
                    cache=cache_dir, env=ONE_THREAD)
    assert warm.returncode == 0, warm.stdout + warm.stderr
    failed = _popen(["pretrain", *TINY, "run.name=failed", "train.lr=1e4",
                     "train.grad_clip=null"], work, cache_dir)
    preempted = _popen(["pretrain", *TINY, "run.name=preempted", "train.max_steps=100000",
                        "train.save_every=0", "train.eval_every=100000"], work, cache_dir)
    metrics = work / "runs" / "pretrain" / "preempted" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and preempted.poll() is None:
        if metrics.is_file() and '"kind": "train"' in metrics.read_text():
            break
        time.sleep(0.05)
    preempted.send_signal(signal.SIGTERM)
    outcomes = {"failed": failed.communicate(timeout=120),
                "preempted": preempted.communicate(timeout=120)}
    codes = {"failed": failed.returncode, "preempted": preempted.returncode}
    return work, codes, outcomes


def runs_json(work: Path, cache: Path, *args: str) -> dict:
    result = run_ptft("runs", *args, "--json", cwd=work, cache=cache)
    assert result.returncode == 0, result.stderr
    return {r["run"]: r for r in json.loads(result.stdout)}


def test_runs_reports_finished_failed_and_preempted(workspace, cache_dir):
    work, codes, outcomes = workspace
    assert codes == {"failed": 1, "preempted": 75}, outcomes
    runs = runs_json(work, cache_dir)
    base, failed, preempted = (runs[f"pretrain/{n}"] for n in ("base", "failed", "preempted"))
    assert base["status"] == "finished" and base["steps"] == 12
    assert base["eval_loss"] < base["first_eval_loss"] and base["eval_ppl"] > 1
    assert base["trainable_parameters"] == base["parameters"] > 0
    assert failed["status"] == "failed" and "non-finite" in failed["reason"]
    assert preempted["status"] == "preempted" and preempted["steps"] >= 1
    assert "SIGTERM" in preempted["reason"]
    for run in (base, failed, preempted):
        assert run["stage"] == "pretrain" and run["method"] == "full"
        assert run["model"] == "llama-tiny" and run["data"] == "python-docs"
        assert run["last_metrics_age_s"] < 600
    # Newest first: the base run started before the other two.
    assert list(runs)[-1] == "pretrain/base"


def test_runs_table_filters_and_a_stale_running_run(workspace, cache_dir):
    work, _, _ = workspace
    # A run whose process vanished still says "running": the age of its last row shows it.
    stale = work / "runs" / "pretrain" / "stale"
    shutil.copytree(work / "runs" / "pretrain" / "base", stale,
                    ignore=shutil.ignore_patterns("final", "checkpoints"))
    summary = json.loads((stale / "summary.json").read_text())
    (stale / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    two_hours_ago = time.time() - 7200
    os.utime(stale / "metrics.jsonl", (two_hours_ago, two_hours_ago))
    try:
        runs = runs_json(work, cache_dir)
        assert runs["pretrain/stale"]["status"] == "running"
        assert runs["pretrain/stale"]["last_metrics_age_s"] > 7000
        table = run_ptft("runs", cwd=work, cache=cache_dir)
        assert table.returncode == 0, table.stderr
        for word in ("pretrain/base", "finished", "failed", "preempted", "running", "2h ago",
                     "llama-tiny", "ppl"):
            assert word in table.stdout, table.stdout
    finally:
        shutil.rmtree(stale)
    assert runs_json(work, cache_dir, "--method", "lora") == {}
    assert set(runs_json(work, cache_dir, "runs/pretrain", "--stage", "pretrain")) == {
        "base", "failed", "preempted"}
    missing = run_ptft("runs", "no-such-dir", cwd=work, cache=cache_dir)
    assert missing.returncode == 2 and "no such directory" in missing.stderr


def test_plot_writes_a_png_and_draws_sparklines(workspace, cache_dir):
    pytest.importorskip("matplotlib", reason="matplotlib (the plot extra) is not installed")
    work, _, _ = workspace
    result = run_ptft("plot", "runs/pretrain/base", "pretrain/preempted", "--x", "tokens",
                      "-o", "curves/loss.png", cwd=work, cache=cache_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "curves/loss.png"
    assert (work / "curves" / "loss.png").read_bytes()[:8] == PNG_MAGIC
    single = run_ptft("plot", "runs/pretrain/base", cwd=work, cache=cache_dir)
    assert single.returncode == 0 and (work / "runs/pretrain/base/loss.png").is_file()
    spark = run_ptft("plot", "runs/pretrain/base", "--terminal", cwd=work, cache=cache_dir)
    assert spark.returncode == 0, spark.stderr
    assert "train" in spark.stdout and "eval" in spark.stdout
    assert any(c in spark.stdout for c in "▁▂▃▄▅▆▇█")
    bad = run_ptft("plot", "runs/pretrain/base", "--x", "epochs", cwd=work, cache=cache_dir)
    assert bad.returncode == 2 and "step, tokens" in bad.stderr
    # A file where the output's folder should be: one line naming it, not a traceback.
    (work / "a-file").write_text("")
    unwritable = run_ptft("plot", "runs/pretrain/base", "-o", "a-file/loss.png", cwd=work,
                          cache=cache_dir)
    assert unwritable.returncode == 2 and "Traceback" not in unwritable.stderr
    assert "cannot write a-file/loss.png" in unwritable.stderr


def test_plot_without_matplotlib_names_the_extra(workspace, cache_dir, tmp_path):
    work, _, _ = workspace
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    result = run_ptft("plot", "runs/pretrain/base", cwd=work, cache=cache_dir,
                      env={"PYTHONPATH": str(shim.parent)})
    assert result.returncode == 2, result.stderr
    assert "pip install 'ptft[plot]'" in result.stderr and "Traceback" not in result.stderr


def test_compare_runs_full_lora_and_adapter_then_compares_run_dirs(workspace, cache_dir):
    pytest.importorskip("matplotlib", reason="matplotlib (the plot extra) is not installed")
    work, _, _ = workspace
    result = run_ptft("compare", *TINY_SFT, "--output", "cmp", cwd=work, cache=cache_dir,
                      env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    out = work / "cmp"
    summaries = {m: json.loads((out / m / "summary.json").read_text())
                 for m in ("full", "lora", "adapter")}
    assert all(s["status"] == "finished" and s["stage"] == "finetune"
               for s in summaries.values())
    # The same base for all three: model.path=latest resolved once, to the finished base run.
    assert {s["model"] for s in summaries.values()} == {
        str((work / "runs/pretrain/base/final").resolve())}
    assert summaries["adapter"]["trainable_parameters"] < \
        summaries["full"]["trainable_parameters"] == summaries["full"]["parameters"]
    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert "trainable params" in table[0] and "peak memory" in table[0]
    assert [row.split(" | ")[0] for row in table[2:]] == [
        "| full fine-tuning", "| LoRA", "| adapters"]
    assert "100%" in table[2] and "KiB" in table[3]
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert "ptft finetune method=lora" in report

    again = run_ptft("compare", "cmp/full", "cmp/lora", "cmp/adapter", "-o", "cmp2",
                     cwd=work, cache=cache_dir)
    assert again.returncode == 0, again.stderr
    assert "| adapters |" in (work / "cmp2" / "report.md").read_text()
    assert (work / "cmp2" / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert "report: cmp2/report.md" in again.stdout
    assert {r["method"] for r in runs_json(work, cache_dir, "cmp").values()} == {
        "full", "lora", "adapter"}


@pytest.mark.parametrize("args, words", [
    (["train.lrr=1"], ["unknown key 'train.lrr'"]),
    (["method=lora"], ["--methods"]),
    (["runs/pretrain/base", "train.lr=1"], ["not both"]),
    (["nowhere"], ["no such run directory"]),
], ids=["typo", "method-override", "runs-and-overrides", "missing-run"])
def test_compare_refuses_bad_arguments_before_any_run(workspace, cache_dir, args, words):
    work, _, _ = workspace
    result = run_ptft("compare", *args, "-o", "refused", cwd=work, cache=cache_dir)
    assert result.returncode == 2, result.stdout + result.stderr
    for word in words:
        assert word in result.stderr
    assert not (work / "refused").exists()


def test_config_sources_names_where_each_value_came_from(tmp_path, cache_dir):
    result = run_ptft("config", "finetune", "method=lora", "train.lr=3e-4", "~train.seq_len",
                      "--sources", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "command line: train.lr=3e-4" in lines["train.lr"]
    assert "~train.seq_len (schema default)" in lines["train.seq_len"]
    assert "configs/method/lora.yaml" in lines["method.r"]
    assert "configs/stage/finetune.yaml" in lines["train.max_steps"]
    assert "configs/model/llama-tiny.yaml" in lines["model.hidden_size"]
    assert "configs/data/docstrings.yaml" in lines["data.source"]
    assert "schema default" in lines["train.beta1"]
    assert "[jsonl]" in lines["run.loggers"]
    plain = run_ptft("config", "train.lr=3e-4", cwd=tmp_path, cache=cache_dir)
    assert plain.returncode == 0 and "lr: 0.0003" in plain.stdout  # YAML stays the default
