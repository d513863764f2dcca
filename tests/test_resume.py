"""Runs that survive: SIGKILL and resume is exact, SIGTERM saves and exits 75, NaN stops
cleanly, half-written checkpoints are ignored, and a changed config is refused on resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import TINY, _ptft_executable, assert_same_weights, rows, run_ptft, wait_for_step

# Long enough to be interrupted; a checkpoint every 5 steps, a metrics row every step.
RESUMABLE = [*TINY, "train.max_steps=40", "train.save_every=5", "train.log_every=1",
             "train.eval_every=10"]


def start_ptft(*args: str, cwd: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "PTFT_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "2"}
    return subprocess.Popen([_ptft_executable(), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    work = tmp_path_factory.mktemp("resume")
    result = run_ptft("pretrain", *RESUMABLE, "run.dir=straight", cwd=work, cache=cache_dir)
    assert result.returncode == 0, result.stderr
    return work


def test_sigkill_then_resume_is_bit_identical(uninterrupted, cache_dir):
    work = uninterrupted
    process = start_ptft("pretrain", *RESUMABLE, "run.dir=killed", cwd=work, cache=cache_dir)
    wait_for_step(work / "killed", 17, process)
    process.kill()  # SIGKILL: no handler runs, nothing is flushed on purpose
    process.wait()
    assert json.loads((work / "killed" / "summary.json").read_text())["status"] == "running"
    result = run_ptft("pretrain", *RESUMABLE, "run.dir=killed", cwd=work, cache=cache_dir)
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout
    assert rows(work / "killed") == rows(work / "straight")  # same losses, no duplicate steps
    assert_same_weights(work / "killed" / "final" / "model.safetensors",
                        work / "straight" / "final" / "model.safetensors")


def test_sigterm_saves_exits_75_and_resumes_exactly(uninterrupted, cache_dir):
    work = uninterrupted
    process = start_ptft("pretrain", *RESUMABLE, "run.dir=preempted", cwd=work, cache=cache_dir)
    wait_for_step(work / "preempted", 12, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr
    assert "run.dir=" in stderr and "resume" in stderr
    summary = json.loads((work / "preempted" / "summary.json").read_text())
    assert summary["status"] == "preempted"
    assert (work / "preempted" / "checkpoints" / f"step-{summary['steps']:06d}" / "COMPLETE").exists()
    result = run_ptft("pretrain", *RESUMABLE, "run.dir=preempted", cwd=work, cache=cache_dir)
    assert result.returncode == 0, result.stderr
    assert rows(work / "preempted") == rows(work / "straight")
    assert_same_weights(work / "preempted" / "final" / "model.safetensors",
                        work / "straight" / "final" / "model.safetensors")


def test_lora_run_resumes_exactly(uninterrupted, cache_dir):
    """LoRA with dropout: exactness needs the RNG state, not just weights and optimizer."""
    work = uninterrupted
    sft = ["data=docstrings", "data.max_documents=120", "data.eval_fraction=0.3",
           "train.seq_len=384", "train.batch_size=2", "train.max_steps=16", "train.save_every=4",
           "train.log_every=1", "train.eval_every=8", "method=lora", "method.dropout=0.1",
           f"model.path={work / 'straight' / 'final'}"]
    straight = run_ptft("finetune", *sft, "run.dir=lora-straight", cwd=work, cache=cache_dir)
    assert straight.returncode == 0, straight.stderr
    process = start_ptft("finetune", *sft, "run.dir=lora-killed", cwd=work, cache=cache_dir)
    wait_for_step(work / "lora-killed", 9, process)
    process.kill()
    process.wait()
    resumed = run_ptft("finetune", *sft, "run.dir=lora-killed", cwd=work, cache=cache_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert rows(work / "lora-killed") == rows(work / "lora-straight")
    assert_same_weights(work / "lora-killed" / "final" / "adapter_model.safetensors",
                        work / "lora-straight" / "final" / "adapter_model.safetensors")


def test_half_written_checkpoints_are_ignored_and_removed(uninterrupted, cache_dir, tmp_path):
    # What a kill during a save leaves: a temporary folder, and a folder without its marker.
    run_dir = tmp_path / "run"
    result = run_ptft("pretrain", *RESUMABLE, "train.max_steps=10", f"run.dir={run_dir}",
                      cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stderr
    checkpoints = run_dir / "checkpoints"
    (checkpoints / ".step-000015.tmp-4242").mkdir()
    (checkpoints / ".step-000015.tmp-4242" / "model.safetensors").write_bytes(b"\0" * 10)
    (checkpoints / "step-000020").mkdir()  # no COMPLETE marker
    result = run_ptft("pretrain", *RESUMABLE, "train.max_steps=12", f"run.dir={run_dir}",
                      cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout and "step-000010" in result.stdout
    assert "train.max_steps: 10 -> 12" in result.stdout  # a safe change, reported
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000005", "step-000010"]


def test_resuming_with_a_changed_model_or_data_is_refused(uninterrupted, cache_dir):
    work = uninterrupted
    result = run_ptft("pretrain", *RESUMABLE, "run.dir=straight", "model.hidden_size=64",
                      "train.seed=7", cwd=work, cache=cache_dir)
    assert result.returncode == 2
    assert "model.hidden_size: 32 -> 64" in result.stderr and "train.seed" in result.stderr
    # Nothing of the finished run was touched.
    assert json.loads((work / "straight" / "summary.json").read_text())["status"] == "finished"


def test_resume_never_refuses_a_directory_with_checkpoints(uninterrupted, cache_dir):
    result = run_ptft("pretrain", *RESUMABLE, "run.dir=straight", "run.resume=never",
                      cwd=uninterrupted, cache=cache_dir)
    assert result.returncode == 2 and "run.resume=never" in result.stderr


def test_resume_from_an_explicit_checkpoint_path(uninterrupted, cache_dir):
    work = uninterrupted
    checkpoint = work / "straight" / "checkpoints" / "step-000030"
    result = run_ptft("pretrain", *RESUMABLE, "run.dir=branch", f"run.resume={checkpoint}",
                      cwd=work, cache=cache_dir)
    assert result.returncode == 0, result.stderr
    assert rows(work / "branch")[("train", 40)] == rows(work / "straight")[("train", 40)]


def test_branching_off_inside_a_run_dir_with_later_checkpoints_is_refused(uninterrupted,
                                                                          cache_dir):
    work = uninterrupted
    checkpoint = work / "straight" / "checkpoints" / "step-000030"
    result = run_ptft("pretrain", *RESUMABLE, "run.dir=straight", f"run.resume={checkpoint}",
                      cwd=work, cache=cache_dir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "step-000035" in result.stderr and "another run.dir" in result.stderr


def test_resuming_on_changed_data_says_so(tmp_path, cache_dir):
    corpus = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": f"line {i}: the quick brown fox jumps over dog {i % 7}."})
             for i in range(300)]
    corpus.write_text("\n".join(lines) + "\n")
    args = [*TINY, "data=jsonl", "data.paths=[c.jsonl]", "train.save_every=4", "run.dir=r"]
    first = run_ptft("pretrain", *args, "train.max_steps=4", cwd=tmp_path, cache=cache_dir)
    assert first.returncode == 0, first.stderr
    same = run_ptft("pretrain", *args, "train.max_steps=6", cwd=tmp_path, cache=cache_dir)
    assert same.returncode == 0 and "differs from the checkpoint" not in same.stdout
    corpus.write_text("\n".join(lines[:250]) + "\n")
    changed = run_ptft("pretrain", *args, "train.max_steps=8", cwd=tmp_path, cache=cache_dir)
    assert changed.returncode == 0, changed.stderr
    assert "resuming from" in changed.stdout and "differs from the checkpoint" in changed.stdout


def test_rerunning_a_finished_run_repeats_nothing(uninterrupted, cache_dir):
    work = uninterrupted
    shutil.copytree(work / "straight", work / "again")
    before = json.loads((work / "again" / "summary.json").read_text())
    result = run_ptft("pretrain", *RESUMABLE, "run.dir=again", cwd=work, cache=cache_dir)
    assert result.returncode == 0, result.stderr
    assert rows(work / "again") == rows(work / "straight")  # the final evaluation not twice
    after = json.loads((work / "again" / "summary.json").read_text())
    for key in ("train_loss", "eval_loss", "first_eval_loss", "steps", "tokens"):
        assert after[key] == before[key], key


def test_a_checkpoint_past_the_run_s_last_step_is_refused(uninterrupted, cache_dir):
    work = uninterrupted
    shutil.copytree(work / "straight", work / "shortened")
    result = run_ptft("pretrain", *RESUMABLE, "train.max_steps=20", "run.dir=shortened",
                      cwd=work, cache=cache_dir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "step 40" in result.stderr and "train.max_steps" in result.stderr
    assert rows(work / "shortened") == rows(work / "straight")  # nothing rewritten


def test_a_metrics_line_cut_short_by_a_crash_does_not_block_resuming(uninterrupted, cache_dir):
    work = uninterrupted
    shutil.copytree(work / "straight", work / "cut")
    for name in ("step-000035", "step-000040"):
        shutil.rmtree(work / "cut" / "checkpoints" / name)
    shutil.rmtree(work / "cut" / "final")
    with open(work / "cut" / "metrics.jsonl", "a") as metrics:
        metrics.write('{"kind": "train", "step": 41, "lo')  # the crash's half line
    result = run_ptft("pretrain", *RESUMABLE, "run.dir=cut", cwd=work, cache=cache_dir)
    assert result.returncode == 0, result.stderr
    assert rows(work / "cut") == rows(work / "straight")


def test_starting_over_in_a_run_dir_without_checkpoints_sets_old_metrics_aside(tmp_path,
                                                                               cache_dir):
    args = [*TINY, "train.save_every=0", "train.eval_every=0", "train.log_every=4", "run.dir=r"]
    for _ in range(2):
        result = run_ptft("pretrain", *args, cwd=tmp_path, cache=cache_dir)
        assert result.returncode == 0, result.stderr
    assert "starting at step 0" in result.stdout
    # Each file holds one run: evaluations only before the first and after the last step.
    for name in ("metrics.jsonl", "metrics.previous.jsonl"):
        metrics = rows_of(tmp_path / "r" / name)
        assert [r["step"] for r in metrics if r["kind"] == "eval"] == [0, 12], name
        assert [r["step"] for r in metrics if r["kind"] == "train"] == [4, 8, 12], name


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_nonfinite_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(
        tmp_path, cache_dir):
    result = run_ptft("pretrain", *TINY, "train.lr=1e4", "train.grad_clip=null",
                      "train.warmup_steps=1", "train.max_steps=30", "train.save_every=2",
                      "train.log_every=1", "run.dir=r", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "non-finite" in result.stderr and "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed"
    metrics = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("nonfinite") for r in metrics)  # visible in the metrics, not filtered out
    import torch
    for checkpoint in (tmp_path / "r" / "checkpoints").iterdir():
        weights = load_file(str(checkpoint / "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values()), checkpoint.name


def test_nonfinite_skip_policy_is_bounded(tmp_path, cache_dir):
    result = run_ptft("pretrain", *TINY, "train.lr=1e4", "train.grad_clip=null",
                      "train.warmup_steps=1", "train.max_steps=30", "train.on_nonfinite=skip",
                      "train.max_nonfinite_skips=3", "run.dir=r", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 1 and "non-finite" in result.stderr
    metrics = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in metrics if r.get("nonfinite")) == 4  # three skipped, the fourth stops


def test_sigkill_while_saving_every_step_leaves_a_loadable_checkpoint(uninterrupted, cache_dir):
    """Saving every step, most of a step's time is spent saving: a SIGKILL then lands in a
    save with high likelihood. Whatever it hit, the run resumes and ends exactly as it should."""
    work = uninterrupted
    args = [*RESUMABLE, "train.save_every=1", "run.dir=kill-in-save"]
    process = start_ptft("pretrain", *args, cwd=work, cache=cache_dir)
    wait_for_step(work / "kill-in-save", 9, process)
    process.kill()
    process.wait()
    result = run_ptft("pretrain", *args, cwd=work, cache=cache_dir)
    assert result.returncode == 0, result.stderr
    assert rows(work / "kill-in-save") == rows(work / "straight")
    assert not [p for p in (work / "kill-in-save" / "checkpoints").iterdir()
                if p.name.startswith(".")]


def test_keys_added_by_a_newer_ptft_do_not_block_resuming():
    from omegaconf import OmegaConf

    from ptft.config.compose import compose
    from ptft.engine.resume import compare_configs
    from ptft.errors import UsageError

    current = OmegaConf.to_container(compose("pretrain", []), enum_to_str=True)
    saved = json.loads(json.dumps(current))
    del saved["run"]["loggers"], saved["train"]["max_nonfinite_skips"]  # an older checkpoint
    assert compare_configs(saved, current) == []
    current["train"]["max_nonfinite_skips"] = 99  # not the default: a real, safe change
    assert compare_configs(saved, current) == ["train.max_nonfinite_skips: None -> 99"]
    current["model"]["hidden_size"] = 7
    with pytest.raises(UsageError, match="model.hidden_size"):
        compare_configs(saved, current)
