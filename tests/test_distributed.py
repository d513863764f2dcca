"""Several processes, one run: real `torchrun` (gloo on CPU) against a single process.

* DDP on 2 processes x batch 4 follows the same loss curve and ends with the same weights as
  1 process x batch 8 (the loss is normalised by the global number of target tokens);
  the same for LoRA fine-tuning, and for LoRA, adapters and prompt tuning under FSDP2.
* FSDP2 on 2 processes trains; killed (SIGKILL, no handler runs) and resumed, it ends
  bit-identical to an uninterrupted FSDP run, for full training and for LoRA.
* SIGTERM to one rank stops every rank at the same step boundary, after a complete
  checkpoint, each rank exiting 75. torchrun itself then exits 1 (any failed worker makes it
  exit 1; its failure report lists each rank's own code, 75: the SIGTERM it sends the other
  ranks on seeing the first 75 finds them saved and exiting), and only rank 0 prints the
  'stopped' line. Under srun, whose exit status is the highest of its tasks',
  the batch script sees 75 (tests/test_slurm.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import TINY, assert_same_weights, rows, wait_for_step

# fp32: these compare 1 and 2 processes to 1e-5, closer than bf16 autocast rounds (on CPUs
# with native bf16, precision=auto would pick it).
COMPARE = [*TINY, "train.max_steps=12", "train.log_every=1", "train.eval_batches=0",
           "train.precision=fp32"]
SFT = ["data=docstrings", "data.max_documents=120", "data.eval_fraction=0.3",
       "train.seq_len=384", "train.max_steps=8", "train.log_every=1", "train.eval_every=4",
       "train.eval_batches=0", "train.warmup_steps=2", "train.precision=fp32"]
FSDP = [*TINY, "train.strategy=fsdp", "train.max_steps=40", "train.save_every=5",
        "train.log_every=1", "train.eval_every=10"]


def _env(cache: Path) -> dict:
    return {**os.environ, "PTFT_CACHE_DIR": str(cache), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def _command(nproc: int, args) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "ptft", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--standalone", "-m", "ptft", *args]


def run(nproc: int, *args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(nproc, args), cwd=cwd, env=_env(cache), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def start(nproc: int, *args: str, cwd: Path, cache: Path) -> subprocess.Popen:
    # A session of its own, so the test can signal torchrun's whole process group.
    return subprocess.Popen(_command(nproc, args), cwd=cwd, env=_env(cache), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def kill_everything(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and its ranks: nothing survives, nothing is flushed."""
    ranks = workers(process.pid)
    assert len(ranks) == 2
    os.killpg(process.pid, signal.SIGKILL)  # torchrun's group...
    for pid in ranks:  # ...and each rank's own session
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.communicate()


def workers(torchrun_pid: int) -> list[int]:
    """The rank processes torchrun started. Each runs in a session of its own (torchrun starts
    them with start_new_session), so killing torchrun's group does not reach them."""
    path = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children")
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


def assert_close_rows(a: Path, b: Path, rel: float = 1e-5) -> None:
    ra, rb = rows(a), rows(b)
    assert ra.keys() == rb.keys()
    for key in ra:
        assert ra[key] == pytest.approx(rb[key], rel=rel), key


def assert_close_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    import torch

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def single_pretrain(work, cache_dir) -> Path:
    """1 process, batch 8: the reference for DDP, and the base model for LoRA."""
    run(1, "pretrain", *COMPARE, "train.batch_size=8", "run.dir=single", cwd=work, cache=cache_dir)
    return work / "single"


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(single_pretrain, work,
                                                                         cache_dir):
    result = run(2, "pretrain", *COMPARE, "train.batch_size=4", "train.strategy=ddp",
                 "run.dir=ddp", cwd=work, cache=cache_dir)
    assert "x 2 processes (ddp)" in result.stdout
    summary = json.loads((work / "ddp" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["world_size"] == 2
    assert_close_rows(work / "ddp", single_pretrain)
    assert_close_weights(work / "ddp" / "final" / "model.safetensors",
                         single_pretrain / "final" / "model.safetensors")


def test_a_failure_on_one_rank_ends_the_run_instead_of_hanging_it(work, cache_dir):
    """Rank 0 alone cannot open metrics.jsonl (a folder stands in its way) while rank 1 goes
    on to the first collective: rank 0 must not wait for it in a barrier (gloo's timeout is
    30 minutes); it exits with its error and torchrun stops rank 1."""
    (work / "blocked" / "metrics.jsonl").mkdir(parents=True)
    result = subprocess.run(_command(2, ["pretrain", *COMPARE, "train.batch_size=4",
                                         "run.dir=blocked"]),
                            cwd=work, env=_env(cache_dir), capture_output=True, text=True,
                            timeout=240)
    assert result.returncode != 0
    assert "IsADirectoryError" in result.stdout + result.stderr


@pytest.mark.parametrize("method, strategy", [("lora", "ddp"), ("lora", "fsdp"),
                                              ("adapter", "fsdp"), ("prompt_tuning", "fsdp")])
def test_lora_and_adapters_on_two_processes_match_one(method, strategy, single_pretrain, work,
                                                       cache_dir):
    # FSDP shards the frozen base weights with the trained ones; final/ holds the gathered
    # adapter weights (prompt tuning: the virtual tokens' embeddings), written by rank 0.
    sft = [*SFT, f"method={method}",
           *(["method.dropout=0"] if method == "lora" else []),
           f"model.path={single_pretrain / 'final'}"]
    one, two = work / f"{method}-1", work / f"{method}-2-{strategy}"
    if not one.exists():
        run(1, "finetune", *sft, "train.batch_size=4", f"run.dir={one.name}", cwd=work,
            cache=cache_dir)
    result = run(2, "finetune", *sft, "train.batch_size=2", f"train.strategy={strategy}",
                 f"run.dir={two.name}", cwd=work, cache=cache_dir)
    assert f"x 2 processes ({strategy})" in result.stdout
    assert_close_rows(two, one)
    assert_close_weights(two / "final" / "adapter_model.safetensors",
                         one / "final" / "adapter_model.safetensors")


def test_fsdp_lora_killed_and_resumed_is_bit_identical(single_pretrain, work, cache_dir):
    sft = [*SFT, "method=lora", "method.dropout=0", "train.save_every=3",
           f"model.path={single_pretrain / 'final'}", "train.strategy=fsdp"]
    run(2, "finetune", *sft, "run.dir=fsdp-lora-straight", cwd=work, cache=cache_dir)
    process = start(2, "finetune", *sft, "run.dir=fsdp-lora-killed", cwd=work, cache=cache_dir)
    wait_for_step(work / "fsdp-lora-killed", 5, process)
    kill_everything(process)
    result = run(2, "finetune", *sft, "run.dir=fsdp-lora-killed", cwd=work, cache=cache_dir)
    assert "resuming from" in result.stdout
    assert rows(work / "fsdp-lora-killed") == rows(work / "fsdp-lora-straight")
    assert_same_weights(work / "fsdp-lora-killed" / "final" / "adapter_model.safetensors",
                        work / "fsdp-lora-straight" / "final" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def fsdp_straight(work, cache_dir) -> Path:
    result = run(2, "pretrain", *FSDP, "run.dir=fsdp-straight", cwd=work, cache=cache_dir)
    assert "x 2 processes (fsdp)" in result.stdout
    return work / "fsdp-straight"


def test_fsdp_killed_and_resumed_is_bit_identical(fsdp_straight, work, cache_dir):
    process = start(2, "pretrain", *FSDP, "run.dir=fsdp-killed", cwd=work, cache=cache_dir)
    wait_for_step(work / "fsdp-killed", 17, process)
    kill_everything(process)
    assert json.loads((work / "fsdp-killed" / "summary.json").read_text())["status"] == "running"
    assert list((work / "fsdp-killed" / "checkpoints").glob("step-*/COMPLETE"))

    result = run(2, "pretrain", *FSDP, "run.dir=fsdp-killed", cwd=work, cache=cache_dir)
    assert "resuming from" in result.stdout
    assert rows(work / "fsdp-killed") == rows(fsdp_straight)  # same losses, no duplicate steps
    assert_same_weights(work / "fsdp-killed" / "final" / "model.safetensors",
                        fsdp_straight / "final" / "model.safetensors")


def test_sigterm_to_one_rank_saves_on_every_rank_and_exits_75(fsdp_straight, work, cache_dir):
    process = start(2, "pretrain", *FSDP, "run.dir=fsdp-term", cwd=work, cache=cache_dir)
    wait_for_step(work / "fsdp-term", 12, process)
    ranks = workers(process.pid)
    assert len(ranks) == 2
    os.kill(ranks[-1], signal.SIGTERM)  # one rank only: the stop flag is agreed across ranks
    _, stderr = process.communicate(timeout=120)

    # The ranks exit 75 and torchrun exits 1, listing the ranks' codes in its report. Seeing
    # the first 75 it stops the other ranks with SIGTERM, which they ignore by then: they have
    # saved (the save ends with a barrier of all ranks) and are exiting 75 themselves.
    assert process.returncode == 1, stderr[-3000:]
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", stderr)
    assert codes and set(codes) == {"75"}, stderr[-3000:]
    assert stderr.count("stopped:") == 1, stderr[-3000:]  # rank 0's line, not one per rank
    summary = json.loads((work / "fsdp-term" / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["reason"].startswith("stopped by")
    assert (work / "fsdp-term" / "checkpoints" / f"step-{summary['steps']:06d}" / "COMPLETE").exists()

    result = run(2, "pretrain", *FSDP, "run.dir=fsdp-term", cwd=work, cache=cache_dir)
    assert f"step-{summary['steps']:06d}" in result.stdout and "resuming from" in result.stdout
    assert rows(work / "fsdp-term") == rows(fsdp_straight)
    assert_same_weights(work / "fsdp-term" / "final" / "model.safetensors",
                        fsdp_straight / "final" / "model.safetensors")


def test_fsdp_shards_the_blocks_transformers_keeps_whole():
    """Decoder layers (transformers' _no_split_modules), also under peft and when another
    ModuleList of the model is longer; GPT-2's blocks; the longest ModuleList otherwise."""
    import torch

    from ptft.config.schema import LoraMethodConfig
    from ptft.engine.distributed import _decoder_layers
    from ptft.methods import apply_method
    from conftest import tiny_llama

    llama = tiny_llama()
    llama.extra = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(5))
    assert _decoder_layers(llama) == list(llama.model.layers)
    lora = apply_method(tiny_llama(), LoraMethodConfig(), "lm")
    assert [type(m).__name__ for m in _decoder_layers(lora)] == ["LlamaDecoderLayer"] * 2
    plain = torch.nn.Sequential(torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3)),
                                torch.nn.ModuleList([torch.nn.Linear(2, 2)]))
    assert _decoder_layers(plain) == list(plain[0])
