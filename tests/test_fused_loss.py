"""The fused linear cross-entropy against PyTorch's own, where the chunked loss is picked, what
train.precision=auto picks, and the malloc setting for CPU runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import devices, tiny_llama
from ptft.config.schema import LoraMethodConfig, Precision, PromptTuningMethodConfig, TrainConfig
from ptft.engine import fused_loss
from ptft.engine.device import autocast_dtype, cpu_runs_bf16_natively, emulated_bf16_warning
from ptft.engine.executor import _chunked_loss
from ptft.engine.fused_loss import linear_cross_entropy
from ptft.errors import UsageError
from ptft.methods import apply_method

N, H, V = 23, 16, 50


def _inputs(bias: bool, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(device).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(device).requires_grad_()
    b = torch.randn(V, generator=g).to(device).requires_grad_() if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[3, 10]] = -100  # ignored rows
    return hidden, weight, b, labels.to(device)


def _loss_and_grads(compute, tensors, dtype):
    for t in tensors:
        t.grad = None
    device = tensors[0].device.type
    with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = compute()
    (loss * 0.5).backward()  # a scaled loss, as the training loop scales it
    return [loss.detach()] + [t.grad for t in tensors]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_fused_loss_matches_cross_entropy_in_loss_and_gradients(bias, dtype, device, monkeypatch,
                                                                matmul_route, exact_fp32_matmuls):
    monkeypatch.setitem(fused_loss.CHUNK_LOGIT_BYTES, device, 4 * V * 7)  # chunks of 7 rows
    monkeypatch.setattr(fused_loss, "ROWS_PER_HIDDEN", 0)  # on either route
    monkeypatch.setattr(fused_loss, "SCRATCH_BYTES", 4 * H * 7)  # bf16 products: 7 rows a time
    hidden, weight, b, labels = _inputs(bias, device)
    tensors = [t for t in (hidden, weight, b) if t is not None]
    want = _loss_and_grads(lambda: F.cross_entropy(F.linear(hidden, weight, b).float(), labels,
                                                   reduction="sum"), tensors, dtype)
    got = _loss_and_grads(lambda: linear_cross_entropy(hidden, weight, b, labels),
                          tensors, dtype)
    # fp32: the same arithmetic in another order; bf16: both round the matmuls to bf16.
    tolerance = 1e-5 if dtype is None else 1e-2
    for a, c in zip(got, want):
        assert a.dtype == c.dtype
        assert torch.allclose(a, c, rtol=tolerance, atol=tolerance * c.abs().max().item())
    # Ignored rows get no gradient at all.
    assert got[1][[3, 10]].abs().max() == 0


def test_cpu_chunks_hold_enough_rows_for_the_weight_gradient():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    # Each chunk adds its (vocab x hidden) weight gradient into the sum: at least 2 x hidden
    # rows per chunk, at most 64 MiB of logits.
    assert fused_loss.chunk_rows(cpu, 8192, 128) == 256  # llama-tiny: 8 MiB of logits
    assert fused_loss.chunk_rows(cpu, 8192, 32) == 256  # narrower: still 8 MiB
    assert fused_loss.chunk_rows(cpu, 16384, 512) == 1024  # llama-small: 2 x 512
    assert fused_loss.chunk_rows(cpu, 128256, 2048) == 2**26 // (4 * 128256)  # capped
    # GPUs: 256 MiB of logits, whatever the width
    assert fused_loss.chunk_rows(gpu, 128256, 2048) == 2**28 // (4 * 128256)


def test_fused_loss_without_gradients_and_with_a_frozen_weight():
    hidden, weight, _, labels = _inputs(False)
    want = F.cross_entropy(hidden @ weight.t(), labels, reduction="sum")
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(hidden, weight, None, labels), want)
    frozen = weight.detach()  # LoRA: the output projection is not trained
    linear_cross_entropy(hidden, frozen, None, labels).backward()
    hidden_grad = hidden.grad.clone()
    hidden.grad = None
    F.cross_entropy(hidden @ frozen.t(), labels, reduction="sum").backward()
    assert torch.allclose(hidden_grad, hidden.grad, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_loss_is_exact_where_the_target_probability_underflows(bias, matmul_route):
    """A diverged model: targets with a loss far beyond fp32's exp range (p underflows to 0)
    still get their exact loss (from those rows' logits computed again: the softmax has
    overwritten them), and the gradient (softmax - onehot) stays right."""
    hidden, weight, b, labels = _inputs(bias)
    labels[labels == -100] = 0
    hidden = (hidden.detach() * 300).requires_grad_()  # logits in the thousands
    want_loss = F.cross_entropy(F.linear(hidden, weight, b), labels, reduction="sum")
    want_loss.backward()
    want_grad, hidden.grad = hidden.grad.clone(), None
    got = linear_cross_entropy(hidden, weight, b, labels)
    got.backward()
    assert want_loss.item() > 1000 and torch.isfinite(got)
    assert torch.allclose(got, want_loss, rtol=1e-5)
    assert torch.allclose(hidden.grad, want_grad, atol=1e-4)


def _tiny_llama():
    return tiny_llama(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1)


def test_chunked_loss_is_on_by_default_wherever_the_model_allows_it():
    assert _chunked_loss(None, _tiny_llama(), "lm") is True
    assert _chunked_loss(False, _tiny_llama(), "lm") is False
    assert _chunked_loss(None, _tiny_llama(), "classification") is False
    assert _chunked_loss(None, apply_method(_tiny_llama(), LoraMethodConfig(), "lm"), "lm")
    prompt = apply_method(_tiny_llama(), PromptTuningMethodConfig(), "lm")
    assert _chunked_loss(None, prompt, "lm") is False  # falls back to the plain loss
    with pytest.raises(UsageError, match="prompt tuning"):
        _chunked_loss(True, prompt, "lm")  # asked for: said why not, before any work


@pytest.mark.parametrize("scaling, chunked", [(8.0, False), (1.0, True)])
def test_chunked_loss_keeps_out_of_models_that_scale_their_logits(scaling, chunked):
    """Granite divides its logits by logits_scaling: a loss from the hidden states through
    the bare projection would train another model than the one saved."""
    from transformers import GraniteConfig, GraniteForCausalLM
    model = GraniteForCausalLM(GraniteConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, logits_scaling=scaling))
    assert _chunked_loss(None, model, "lm") is chunked


def test_precision_auto_takes_bf16_on_cpus_with_native_bf16():
    assert cpu_runs_bf16_natively("processor: 0\nflags\t\t: fpu avx512f avx512_bf16 sse\n")
    assert cpu_runs_bf16_natively("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert not cpu_runs_bf16_natively("flags\t\t: fpu avx2 avx512f avx512bw\n")
    assert not cpu_runs_bf16_natively("")
    cpu = torch.device("cpu")
    native = torch.bfloat16 if cpu_runs_bf16_natively() else None
    assert autocast_dtype(TrainConfig(precision=Precision.auto), cpu) == native
    assert autocast_dtype(TrainConfig(precision=Precision.fp32), cpu) is None
    assert autocast_dtype(TrainConfig(precision=Precision.bf16), cpu) == torch.bfloat16


def test_bf16_asked_for_on_a_cpu_that_emulates_it_is_warned_of():
    cpu = torch.device("cpu")
    avx2, native = "flags\t\t: fpu avx2 fma\n", "flags\t\t: fpu avx512_bf16\n"
    message = emulated_bf16_warning(torch.bfloat16, cpu, avx2)
    assert "train.precision=auto takes fp32" in message and "AVX512-BF16" in message
    assert emulated_bf16_warning(torch.bfloat16, cpu, native) is None
    assert emulated_bf16_warning(None, cpu, avx2) is None  # fp32
    assert emulated_bf16_warning(torch.bfloat16, torch.device("cuda"), avx2) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_setting_applies_unless_the_user_chose_one():
    code = "from ptft.engine.allocator import keep_freed_memory; print(keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr
    chosen = {**env, "MALLOC_TRIM_THRESHOLD_": "1000000"}
    out = subprocess.run([sys.executable, "-c", code], env=chosen, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_come_from_the_heap_during_training_steps_only():
    # 64 MiB, above the 32 MiB that glibc's mmap threshold can reach (llama-small's loss
    # chunks): a fresh mapping is page-faulted in again each time it is allocated.
    code = """if True:
        import ctypes, torch
        from ptft.engine.allocator import keep_freed_memory, training_step_allocations
        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        mallinfo2.restype = MallInfo2
        def mapped_bytes_with_a_block_of(floats):
            block = torch.ones(floats)
            return mallinfo2().hblkhd  # bytes in mmap()ed blocks
        assert keep_freed_memory()
        outside = mapped_bytes_with_a_block_of(2**24)
        training_step_allocations(True)
        inside = mapped_bytes_with_a_block_of(2**24)
        training_step_allocations(False)
        # larger than the freed 64 MiB block the heap keeps: mapped again
        print(outside, inside, mapped_bytes_with_a_block_of(2**25))
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if "mallinfo2" in out.stderr:
        pytest.skip("glibc older than 2.33 (no mallinfo2)")
    assert out.returncode == 0, out.stderr
    outside, inside, after = map(int, out.stdout.split())
    assert outside >= 2**26 and after >= 2**26  # one-off buffers: mapped, unmapped when freed
    assert inside < 2**26  # within a step: from the kept heap
