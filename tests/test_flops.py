"""MFU and the speed options: FLOPs per token by hand, the device peak (table, cached CPU probe),
the chunked and target-only losses against plain cross-entropy, activation checkpointing with
every method, and the figures an executor run reports."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ptft.config.compose import compose, to_object
from ptft.config.schema import AdapterMethodConfig, LoraMethodConfig
from ptft.data.batches import IGNORE_INDEX, Batch
from ptft.engine import flops as flops_module
from ptft.engine import fused_loss, objective
from ptft.engine.executor import _activation_checkpointing, execute
from ptft.engine.device import cpu_runs_bf16_natively
from ptft.engine.flops import (TrainingFlops, cpu_matmul_probe, cpu_matmul_rates,
                               cpu_peak_dtype, device_peak_flops, gpu_peak_flops, input_tokens,
                               mfu, remeasure_cpu_matmul_rates, training_flops)
from ptft.methods import apply_method
from tests.conftest import TINY
from tests.conftest import tiny_llama as shared_tiny_llama

V, D, L, H, KV, I, T = 320, 32, 2, 4, 2, 64, 16  # vocab, hidden, layers, heads, kv heads, ffn, seq


def tiny_llama(seed: int = 0, tied: bool = True):
    return shared_tiny_llama(seed, vocab_size=V, hidden_size=D, intermediate_size=I,
                             num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=KV,
                             tie_word_embeddings=tied)


# ---- FLOPs per token ---------------------------------------------------------------------

def test_flops_per_token_by_hand_for_a_tiny_llama():
    q = D // H  # head size 8; 2 key/value heads of 8 (grouped-query attention)
    layer = D * H * q + 2 * D * KV * q + H * q * D + 3 * D * I  # q, k, v, o; gate, up, down
    expected = TrainingFlops(per_token=6 * L * layer, per_target=6 * V * D,
                             per_attended=12 * L * H * q, seq_len=T)
    assert training_flops(tiny_llama(), T) == expected
    # Untied: the same compute (the input embedding is a lookup either way).
    assert training_flops(tiny_llama(tied=False), T) == expected
    assert expected.per_block_token == 6 * L * layer + 6 * V * D + 12 * L * H * q * T
    assert expected.step(tokens=2 * T, targets=4) == (
        2 * T * expected.per_token + 4 * expected.per_target + 12 * L * H * q * 2 * T * T)
    # Two packed samples of 3 and 5 tokens attend within themselves: 9 + 25 pairs, not 8 x T.
    assert expected.step(tokens=8, targets=8, attended=9 + 25) == (
        8 * expected.per_token + 8 * expected.per_target + 12 * L * H * q * 34)


def test_attended_pairs_follow_what_attends_to_what():
    from ptft.engine.flops import attended_pairs
    ids = torch.zeros(2, 8, dtype=torch.long)
    labels = torch.zeros(2, 8, dtype=torch.long)
    assert attended_pairs(Batch({"input_ids": ids}, labels, 16)) == 2 * 8 * 8  # full blocks
    mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5])
    assert attended_pairs(Batch({"input_ids": ids, "attention_mask": mask}, labels, 11)) == 64 + 9
    packed = Batch({"input_ids": ids}, labels, 16, segments=(((0, 3), (3, 8)), ((0, 6),)))
    assert attended_pairs(packed) == 9 + 25 + 36


def test_frozen_weights_cost_four_flops_per_weight_lora_six():
    model = apply_method(tiny_llama(), LoraMethodConfig(r=4, target_modules=["q_proj"]), "lm")
    q = D // H
    frozen = L * (D * H * q + 2 * D * KV * q + H * q * D + 3 * D * I)
    lora = L * (D * 4 + 4 * H * q)  # A: hidden -> r, B: r -> q_proj's output
    got = training_flops(model, T)
    assert got.per_token == 4 * frozen + 6 * lora and got.per_attended == 12 * L * H * q
    assert got.per_target == 4 * V * D  # the frozen lm_head still runs forward and backward


def test_mfu_arithmetic():
    assert mfu(1000.0, 6e6, 1.2e10) == pytest.approx(0.5)
    assert mfu(1000.0, 6e6, None) is None


def test_meter_counts_only_the_steps_it_timed():
    """After a resume, an interval's first row must not divide the targets of steps run
    before the resume by the time of the steps after it."""
    batch = Batch(inputs={"input_ids": torch.zeros(2, 8, dtype=torch.long)},
                  labels=torch.zeros(2, 8, dtype=torch.long), num_targets=16)
    meter = flops_module.TrainingMeter(TrainingFlops(10.0, 2.0), 1e9, started=0.0)
    for targets in (16, 16):
        meter.begin_step()
        meter.end_step([batch], targets)
    seconds, targets, _ = meter.take_interval()
    assert targets == 32 and seconds > 0 and meter.total_targets == 32
    assert meter.take_interval()[1] == 0  # a new interval starts empty


# ---- the device peak ---------------------------------------------------------------------

def test_gpu_table_by_device_name():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert gpu_peak_flops("NVIDIA H200", torch.bfloat16) == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert gpu_peak_flops("NVIDIA A10G", torch.bfloat16) == 125e12
    assert gpu_peak_flops("NVIDIA L4", torch.bfloat16) == 121e12
    assert gpu_peak_flops("NVIDIA L40S", torch.bfloat16) == 362e12
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", torch.float16) == 125e12
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", torch.bfloat16) is None
    assert gpu_peak_flops("Some Future GPU", torch.bfloat16) is None


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.delenv(flops_module.PEAK_ENV, raising=False)
    monkeypatch.setattr(flops_module, "_cpus_busy", lambda: True)
    peak = device_peak_flops("cpu", torch.float32, tmp_path)
    assert peak > 1e8 and not (tmp_path / "peak-flops").exists()  # busy cores: not kept
    monkeypatch.setattr(flops_module, "_cpus_busy", lambda: False)
    peak = device_peak_flops("cpu", torch.float32, tmp_path)
    assert peak > 1e8  # any CPU does a 100 MFLOP/s matmul
    (cached,) = (tmp_path / "peak-flops").glob("cpu-*.json")
    record = json.loads(cached.read_text())
    assert record["peak_flops"] == peak
    assert record["threads"] == torch.get_num_threads() and record["dtype"] == "fp32"
    # The second call reads the file: no new probe.
    monkeypatch.setattr(flops_module, "cpu_matmul_probe_rates",
                        lambda *a, **k: pytest.fail("probed"))
    cached.write_text(json.dumps({**record, "rates": {"torch": 123.0, "onednn": 99.0}}))
    assert device_peak_flops("cpu", torch.float32, tmp_path) == 123.0  # the faster route's
    monkeypatch.setenv(flops_module.PEAK_ENV, "5e11")
    assert device_peak_flops("cpu", torch.float32, tmp_path) == 5e11


def test_bf16_on_a_cpu_that_emulates_it_is_measured_against_the_fp32_peak(tmp_path, monkeypatch):
    monkeypatch.delenv(flops_module.PEAK_ENV, raising=False)
    native = cpu_runs_bf16_natively()
    assert cpu_peak_dtype(torch.float32) == torch.float32
    assert cpu_peak_dtype(torch.bfloat16) == (torch.bfloat16 if native else torch.float32)
    monkeypatch.setattr(flops_module, "cpu_matmul_probe_rates",
                        lambda dtype, *a, **k: {"torch": 7.0 if dtype == torch.bfloat16 else 5.0})
    monkeypatch.setattr(flops_module, "_cpus_busy", lambda: False)
    assert device_peak_flops("cpu", torch.bfloat16, tmp_path) == (7.0 if native else 5.0)


def test_a_new_probe_raises_a_cached_peak_read_in_a_slow_minute(tmp_path, monkeypatch):
    monkeypatch.delenv(flops_module.PEAK_ENV, raising=False)
    readings = iter([{"torch": 100.0, "onednn": 90.0}, {"torch": 130.0, "onednn": 80.0},
                     {"torch": 120.0, "onednn": 85.0}, {"torch": 500.0}])
    monkeypatch.setattr(flops_module, "cpu_matmul_probe_rates", lambda *a, **k: next(readings))
    monkeypatch.setattr(flops_module, "_cpus_busy", lambda: False)
    assert device_peak_flops("cpu", torch.float32, tmp_path) == 100.0  # the first probe
    # A later reading returns itself; the cache keeps each route's best.
    assert remeasure_cpu_matmul_rates(torch.float32, tmp_path) == {"torch": 130.0, "onednn": 80.0}
    assert cpu_matmul_rates(torch.float32, tmp_path) == {"torch": 130.0, "onednn": 90.0}
    remeasure_cpu_matmul_rates(torch.float32, tmp_path)  # lower: nothing falls
    assert device_peak_flops("cpu", torch.float32, tmp_path) == 130.0
    monkeypatch.setattr(flops_module, "_cpus_busy", lambda: True)
    remeasure_cpu_matmul_rates(torch.float32, tmp_path)  # busy cores: not kept, even if higher
    assert device_peak_flops("cpu", torch.float32, tmp_path) == 130.0


def test_cpu_probe_leaves_the_seeded_random_numbers_alone():
    # The probe runs after the run is seeded, and only when no peak is cached: drawing from the
    # global generator would make dropout (and everything random after it) depend on the cache.
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    cpu_matmul_probe(torch.float32, size=64, budget_s=0.01)
    assert torch.equal(torch.rand(4), expected)


# ---- losses ------------------------------------------------------------------------------

def _sft_batch(seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, T), generator=g)
    labels = torch.randint(0, V, (3, T), generator=g)
    labels[:, :5] = IGNORE_INDEX            # a masked prompt
    labels[1, 11:] = IGNORE_INDEX           # padding
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    return Batch({"input_ids": ids, "attention_mask": mask}, labels,
                 int((labels != IGNORE_INDEX).sum()))


def _loss_and_grads(model, compute):
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_and_target_only_losses_equal_plain_cross_entropy(tied, monkeypatch):
    model, batch = tiny_llama(tied=tied), _sft_batch()

    def plain():
        logits = model(**batch.inputs).logits.float()
        return F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    ref_loss, ref_grads = _loss_and_grads(model, plain)
    monkeypatch.setitem(fused_loss.CHUNK_LOGIT_BYTES, "cpu", 4 * V * 7)  # chunks of 7 rows
    for chunked in (False, True):
        loss, grads = _loss_and_grads(model, lambda: objective.loss_sum(model, batch, "lm",
                                                                        chunked=chunked))
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert len(grads) == len(ref_grads)
        for got, want in zip(grads, ref_grads):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    # Pre-training blocks (every position a target) and evaluation agree too.
    block = Batch({"input_ids": batch.inputs["input_ids"]}, batch.inputs["input_ids"], 3 * T)
    with torch.no_grad():
        full = objective.loss_sum(model, block, "lm")
        assert torch.allclose(objective.loss_sum(model, block, "lm", chunked=True), full,
                              rtol=1e-5)


# ---- activation checkpointing --------------------------------------------------------------

@pytest.mark.parametrize("method", ["full", "lora", "adapter"])
def test_activation_checkpointing_gives_the_same_gradients(method):
    configs = {"lora": LoraMethodConfig(dropout=0.0), "adapter": AdapterMethodConfig()}
    batch = _sft_batch()

    def grads(checkpointing: bool):
        model = tiny_llama(seed=3)
        if method != "full":
            torch.manual_seed(4)
            model = apply_method(model, configs[method], "lm")
        _activation_checkpointing(model, checkpointing)
        model.train()
        return _loss_and_grads(model, lambda: objective.loss_sum(model, batch, "lm"))

    (loss_a, grads_a), (loss_b, grads_b) = grads(False), grads(True)
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert grads_a and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads_a, grads_b))


def test_input_tokens_leave_out_marked_padding():
    batch = _sft_batch()
    assert input_tokens(batch) == 3 * T - 4
    assert input_tokens(Batch({"input_ids": torch.zeros(2, 5, dtype=torch.long)},
                              torch.zeros(2, 5), 10)) == 10


# ---- what a run reports ------------------------------------------------------------------

def test_a_run_reports_mfu_and_time_to_first_step(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("PTFT_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv(flops_module.PEAK_ENV, "1e11")  # no probe in this test
    cfg = to_object(compose("pretrain", TINY + [
        f"run.dir={tmp_path / 'run'}", "train.max_steps=4", "train.save_every=0",
        "train.log_every=2", "train.activation_checkpointing=true", "train.chunked_loss=true"]))
    summary = execute(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    for row in train:
        # tokens/s and MFU of the same steps: MFU = tokens/s x FLOPs per token / peak
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * summary["flops_per_token"]
                                           / 1e11, rel=1e-6)
    assert 0 < summary["mfu"] < 1 and summary["peak_flops"] == 1e11
    assert 0 < summary["time_to_first_step_s"] < summary["wall_s"]
    assert 0 < summary["data_prep_s"] < summary["time_to_first_step_s"]
    assert summary["chunked_loss"] is True and summary["precision"] in ("fp32", "bfloat16")
    assert summary["status"] == "finished"
