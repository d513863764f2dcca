"""The fused rotary embedding against transformers' own (ptft/engine/rotary.py): the same
queries and keys and gradients, in fp32 and with bf16 queries, and a model that trains the
same with it; transformers' function is back after restore()."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama import modeling_llama

from conftest import assert_same_loss_and_grads, lm_loss_and_grads, tiny_llama
from ptft.engine import rotary

ORIGINAL = modeling_llama.apply_rotary_pos_emb


def _cos_sin(batch, length, head, positions_per_row=False):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head, 2).float() / head))
    positions = torch.arange(length).float()
    if positions_per_row:  # packed rows restart their positions
        positions = torch.stack([positions, positions.roll(5)])[:batch]
    freqs = positions[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    emb = emb if positions_per_row else emb[None]
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions_per_row", [False, True])
def test_same_rotation_and_gradients_as_transformers(dtype, positions_per_row):
    batch, heads, kv_heads, length, head = 2, 4, 2, 9, 8
    cos, sin = _cos_sin(batch, length, head, positions_per_row)
    # the projections' layout: (batch, length, heads, head) seen as (batch, heads, length, head)
    q = torch.randn(batch, length, heads * head).to(dtype)
    k = torch.randn(batch, length, kv_heads * head).to(dtype)
    grad_q = torch.randn(batch, heads, length, head)
    grad_k = torch.randn(batch, kv_heads, length, head)
    results = []
    for apply in (ORIGINAL, rotary._FusedRotary(ORIGINAL)):
        q_, k_ = q.clone().requires_grad_(), k.clone().requires_grad_()
        out_q, out_k = apply(q_.view(batch, length, heads, head).transpose(1, 2),
                             k_.view(batch, length, kv_heads, head).transpose(1, 2), cos, sin)
        torch.autograd.backward([out_q, out_k], [grad_q.to(out_q.dtype), grad_k.to(out_k.dtype)])
        results.append((out_q.detach(), out_k.detach(), q_.grad, k_.grad))
    for want, got in zip(*results):
        assert got.dtype == want.dtype and got.shape == want.shape
        tolerance = 1e-6 if want.dtype == torch.float32 else 1e-2
        assert torch.allclose(got.float(), want.float(), rtol=tolerance, atol=tolerance)


def test_without_gradients_and_where_it_does_not_apply():
    cos, sin = _cos_sin(1, 5, 8)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    fused = rotary._FusedRotary(ORIGINAL)
    for got, want in zip(fused(q, k, cos, sin), ORIGINAL(q, k, cos, sin)):
        assert got.grad_fn is None and torch.allclose(got, want, atol=1e-6)
    # cos/sin that need gradients take transformers' own function, which gives them theirs
    cos_ = cos.clone().requires_grad_()
    out_q, _ = fused(q, k, cos_, sin)
    out_q.sum().backward()
    assert cos_.grad is not None


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_a_model_trains_the_same_and_restore_undoes_it(dtype, monkeypatch):
    rotations = []
    rotate = rotary.rotate
    monkeypatch.setattr(rotary, "rotate", lambda *args, **kw: rotations.append(1) or
                        rotate(*args, **kw))
    theirs = tiny_llama()
    ours = copy.deepcopy(theirs)
    want = lm_loss_and_grads(theirs, dtype)
    assert rotary.use_fused_rotary(ours) == ["transformers.models.llama.modeling_llama"]
    try:
        got = lm_loss_and_grads(ours, dtype)
    finally:
        rotary.restore()
    assert modeling_llama.apply_rotary_pos_emb is ORIGINAL
    assert len(rotations) == 2 * 2 * 2  # 2 layers, queries and keys, forward and backward
    assert_same_loss_and_grads(want, got, dtype)
