"""End to end: the real `ptft` CLI pre-trains a tiny model and leaves a complete run directory."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

from conftest import TINY, run_ptft


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir):
    """One tiny pre-training run shared by the assertions below."""
    work = tmp_path_factory.mktemp("work")
    result = run_ptft("pretrain", *TINY, "run.dir=runs/first", "train.lr=1e-2",
                      "train.max_steps=24", "train.eval_every=12", "train.save_every=12",
                      "train.log_every=6",
                      cwd=work, cache=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return work / "runs" / "first", result


def test_run_directory_layout(finished_run):
    run_dir, _ = finished_run
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json",
                 "checkpoints/step-000012/COMPLETE", "checkpoints/step-000024/COMPLETE"):
        assert (run_dir / name).exists(), name
    assert not list(run_dir.glob("checkpoints/.*")), "temporary checkpoint folders left behind"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["lr"] == 1e-2
    assert config["run"]["dir"].endswith("runs/first")
    assert config["model"]["hidden_size"] == 32


def test_metrics_and_summary(finished_run):
    run_dir, result = finished_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [6, 12, 18, 24]
    assert [r["step"] for r in evals] == [0, 12, 24]
    for row in train:
        assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"} <= row.keys()
    assert train[-1]["tokens"] == 24 * 4 * 32
    assert evals[-1]["eval_ppl"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    # Learning happened: the final evaluation is clearly below the first.
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 24
    assert summary["eval_loss"] == pytest.approx(evals[-1]["eval_loss"])
    assert summary["trainable_parameters"] == summary["parameters"] > 0
    # Start-up line and final table for a person reading the log.
    assert "parameters" in result.stdout and "train tokens" in result.stdout
    assert "run summary" in result.stdout


def test_final_loads_with_plain_transformers_and_generates(finished_run):
    run_dir, _ = finished_run
    code = f"""
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(run_dir / 'final')!r})
tok = AutoTokenizer.from_pretrained({str(run_dir / 'final')!r})
ids = tok("The assert statement", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
assert out.shape[1] > ids.shape[1]
print("ptft" in sys.modules, repr(tok.decode(out[0])))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("False")  # no ptft import was needed


def test_second_run_reuses_cached_tokenizer_and_tokens(finished_run, cache_dir, tmp_path):
    _, first = finished_run
    result = run_ptft("pretrain", *TINY, "train.max_steps=1", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stderr
    assert "tokenizer from cache" in result.stdout and "tokens from cache" in result.stdout
    # The automatic run directory lives under runs/pretrain/<timestamp>.
    assert len(list((tmp_path / "runs" / "pretrain").iterdir())) == 1


def test_bf16_asked_for_on_a_cpu_without_native_bf16_warns_and_runs(cache_dir, tmp_path):
    from ptft.engine.device import cpu_runs_bf16_natively

    result = run_ptft("pretrain", *TINY, "train.max_steps=1", "train.precision=bf16",
                      "run.dir=bf16", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stderr
    # The choice is the user's (bf16 it is); only the warning depends on this CPU.
    assert json.loads((tmp_path / "bf16" / "summary.json").read_text())["precision"] == "bfloat16"
    warned = "torch emulates bf16 matmuls here" in " ".join(result.stdout.split())
    assert warned == (not cpu_runs_bf16_natively()), result.stdout


def test_same_seed_same_losses(finished_run, cache_dir, tmp_path):
    run_dir, _ = finished_run
    result = run_ptft("pretrain", *TINY, "train.lr=1e-2", "train.max_steps=24", "train.eval_every=12",
                      "train.log_every=6", "run.dir=again", "train.save_every=0",
                      cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stderr
    losses = lambda path: [json.loads(l).get("loss") for l in path.read_text().splitlines()]
    assert losses(tmp_path / "again" / "metrics.jsonl") == losses(run_dir / "metrics.jsonl")
    assert not (tmp_path / "again" / "checkpoints").exists()  # save_every=0: only final/


def test_continued_pretraining_from_model_path(finished_run, cache_dir, tmp_path):
    run_dir, _ = finished_run
    result = run_ptft("pretrain", *TINY, f"model.path={run_dir / 'final'}", "train.max_steps=2",
                      "run.dir=continued", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stderr
    evals = [json.loads(l) for l in (tmp_path / "continued" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in l]
    first = json.loads((run_dir / "summary.json").read_text())
    # Starting from the trained weights, not from scratch.
    assert evals[0]["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-4)


def test_multirun_makes_one_run_per_value(cache_dir, tmp_path):
    result = run_ptft("pretrain", "-m", *TINY, "train.lr=1e-3,3e-4", "train.max_steps=2",
                      "train.save_every=0", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    summaries = sorted(tmp_path.glob("runs/pretrain/multirun-*/job-*/summary.json"))
    assert len(summaries) == 2
    lrs = sorted(yaml.safe_load((s.parent / "config.yaml").read_text())["train"]["lr"]
                 for s in summaries)
    assert lrs == [3e-4, 1e-3]


def test_a_sweep_into_run_dir_gives_each_job_its_folder_and_survives_a_failed_job(
        cache_dir, tmp_path):
    # lr=1e30 diverges at once; the other job must still run, and the sweep exit non-zero.
    result = run_ptft("pretrain", "-m", *TINY, "train.lr=1e30,1e-3", "train.max_steps=3",
                      "train.warmup_steps=0", "train.grad_clip=null", "train.save_every=0",
                      "run.dir='lr,sweep'", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert "1 of 2 jobs failed: job 0 (exit 1)" in result.stderr
    jobs = tmp_path / "lr,sweep"
    statuses = [json.loads((jobs / f"job-{n}" / "summary.json").read_text())["status"]
                for n in (0, 1)]
    assert statuses == ["failed", "finished"]


def test_python_dash_m_works_like_the_command(tmp_path, cache_dir):
    result = run_ptft("config", "train.lr=0.5", cwd=tmp_path, cache=cache_dir, module=True)
    assert result.returncode == 0, result.stderr
    assert "lr: 0.5" in result.stdout
