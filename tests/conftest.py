"""Shared test helpers: the real CLI in a subprocess, on a tiny model and tiny data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

# A 2-layer, hidden-size-32 Llama on 32-token blocks: trains in seconds on a CPU.
TINY_MODEL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
              "model.intermediate_size=64", "model.vocab_size=320"]
TINY_TRAIN = ["train.seq_len=32", "train.batch_size=4", "train.max_steps=12",
              "train.warmup_steps=2", "train.eval_every=6", "train.save_every=6",
              "train.log_every=3", "train.eval_batches=2"]
# The first documents of the embedded corpus are pydoc topics: real text, no parsing needed.
TINY_DATA = ["data=python-docs", "data.max_documents=24", "data.eval_fraction=0.1"]
TINY = TINY_MODEL + TINY_TRAIN + TINY_DATA


def devices() -> list:
    """"cpu", and "cuda" where a GPU is present (skipped elsewhere): for tests of code with
    device-specific paths, so that a GPU machine runs them on its device too."""
    import torch

    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device"))]


def tiny_llama(seed: int = 0, **config):
    """A randomly initialised Llama with SDPA attention, the same for the same `seed`: 2 layers,
    hidden size 32, unless `config` (LlamaConfig fields) says otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**{**shape, **config}),
                                            attn_implementation="sdpa")


@pytest.fixture(params=[False, True], ids=["torch-matmul", "onednn-matmul"])
def matmul_route(request):
    """Each fp32 CPU projection route in turn (ptft/engine/onednn_linear.py): torch.mm, and
    oneDNN where this torch has it; the process-wide switch is put back afterwards."""
    from ptft.engine import onednn_linear

    if request.param and not onednn_linear.available():
        pytest.skip("this torch has no oneDNN linear op")
    before = onednn_linear.routed()
    onednn_linear.route_fp32_linears(request.param)
    yield request.param
    onednn_linear.route_fp32_linears(before)


@pytest.fixture
def exact_fp32_matmuls():
    """fp32 CUDA matmuls in full fp32 (no TF32) for the test, put back afterwards. Set and
    restored by plain assignment: torch serves `allow_tf32` through the module's __getattr__, and
    pytest 9.2's monkeypatch, finding no such entry in the module's __dict__, deletes it on undo
    (an AttributeError that also skips the undoing of the test's other patches)."""
    import torch

    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = False
    yield
    matmul.allow_tf32 = before


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One data cache for the whole session, so tokenizers are trained once. It holds the CPU
    matmul probe's fp32 rates from the start: a probe taken while the suite keeps the cores
    busy is not cached, so each run would probe again, and where oneDNN and MKL run at about
    one rate (an AVX2 Zen 3) runs compared with each other could take different libraries."""
    import torch

    from ptft.engine import flops

    path = tmp_path_factory.mktemp("ptft-cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the runs' (OMP_NUM_THREADS below): the cache is keyed by it
    try:
        flops.keep_best_cpu_matmul_rates(flops.cpu_matmul_probe_rates(torch.float32, size=512),
                                         torch.float32, path)
    finally:
        torch.set_num_threads(threads)
    return path


def run_ptft(*args: str, cwd: Path, cache: Path, timeout: int = 300, module: bool = False,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `ptft` command (or `python -m ptft`) and capture its output."""
    command = [sys.executable, "-m", "ptft"] if module else [_ptft_executable()]
    # A fixed MFU peak: under a busy test run the CPU probe would be measured (not cached) in
    # every run; test_flops.py tests the probe itself.
    full_env = {**os.environ, "PTFT_CACHE_DIR": str(cache), "COLUMNS": "200",
                "OMP_NUM_THREADS": "2", "PTFT_PEAK_FLOPS": "1e11", **(env or {})}
    return subprocess.run([*command, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def _ptft_executable() -> str:
    script = Path(sys.executable).parent / "ptft"
    return str(script) if script.exists() else "ptft"


# Shared by the tests that interrupt and resume runs.
def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    """Block until metrics.jsonl shows `step` (the run is mid-training)."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and f'"step": {step},' in metrics.read_text():
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError(f"step {step} never came")


def rows(run_dir: Path) -> dict:
    """{(kind, step): loss} of a run's metrics; fails on a step logged twice (a resume must
    not repeat rows). Rows of skipped non-finite steps are left out."""
    found = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if not r.get("nonfinite")]
    keys = [(r["kind"], r["step"]) for r in found]
    assert len(keys) == len(set(keys)), f"rows logged twice in {run_dir}: {keys}"
    return {(r["kind"], r["step"]): r.get("loss", r.get("eval_loss")) for r in found}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] == wb[name]).all(), f"{name} differs"


def lm_loss_and_grads(model, dtype=None):
    """A language-modelling loss of `model` on a fixed batch and its parameter gradients, in fp32
    or under CPU autocast to `dtype`."""
    import torch

    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_same_loss_and_grads(want, got, dtype=None) -> None:
    """Two lm_loss_and_grads results alike: 1e-5 relative in fp32, 2e-2 in bf16."""
    import torch

    (want_loss, want_grads), (got_loss, got_grads) = want, got
    tolerance = 1e-5 if dtype is None else 2e-2
    assert torch.allclose(got_loss, want_loss, rtol=tolerance)
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, rtol=tolerance,
                              atol=tolerance * grad.abs().max().item()), name


def backward_node_names(tensor) -> set[str]:
    """The class names of every autograd node behind `tensor` (which functions computed it)."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    return {type(node).__name__ for node in seen}
