"""CPU causal attention by query blocks (ptft/engine/causal_attention.py): SDPA's outputs and
gradients, grouped-query heads included, products in the autocast dtype as eager attention
under autocast, and used by the attention
ptft installs for CPU runs where it pays (pre-training rows, long packed samples) but not
where it would compute something else (dropout, masks) or cost more (short sequences)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ptft.data.batches import Batch
from ptft.engine.causal_attention import (LOW_PRECISION_MIN_COLUMNS, MAX_LENGTH,
                                          causal_attention, pays_for)
from ptft.engine.objective import accumulate_gradients
from ptft.engine.packed_attention import packed_sdpa_attention, use_packed_attention
from tests.conftest import backward_node_names, tiny_llama

CPU = torch.device("cpu")
BLOCKED = "_BlockedCausalAttentionBackward"


def _qkv(batch, heads, kv_heads, length, width, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, length, width)] + [(batch, kv_heads, length, width)] * 2
    return [torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("shape", [
    (3, 4, 4, 200, 16),  # 3 blocks of uneven size
    (2, 6, 2, 130, 8),   # grouped-query: 3 query heads per key/value head
    (1, 2, 2, 40, 8),    # one block
    (2, 2, 1, 5, 4),     # a few positions
])
def test_same_outputs_and_gradients_as_sdpa(shape):
    batch, heads, kv_heads, length, width = shape
    query, key, value = _qkv(*shape)
    grad_out = torch.randn(batch, heads, length, width, generator=torch.Generator().manual_seed(1))
    want = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=0.3,
                                          enable_gqa=True)
    want_grads = torch.autograd.grad(want, (query, key, value), grad_out)
    got = causal_attention(query, key, value, 0.3)
    assert BLOCKED in backward_node_names(got)
    got_grads = torch.autograd.grad(got, (query, key, value), grad_out)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g, w in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():  # the forward-only path keeps nothing for backward, same result
        torch.testing.assert_close(causal_attention(query, key, value, 0.3), got,
                                   rtol=0, atol=0)


def _eager_attention(query, key, value, scale):
    """transformers' eager attention under autocast: matmuls in the autocast dtype, softmax in
    fp32 rounded back, causal mask."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    length = query.shape[2]
    scores = scores + torch.full((length, length), float("-inf")).triu(1).to(scores.dtype)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value)


def test_products_in_the_autocast_dtype_as_eager_attention_under_autocast():
    query, key, value = _qkv(16, 4, 2, 160, 32, seed=3)  # 16 x 2 pairs x 32: wide enough
    grad_out = torch.randn(16, 4, 160, 32, generator=torch.Generator().manual_seed(4))
    exact = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=0.35,
                                           enable_gqa=True)
    exact_grads = torch.autograd.grad(exact, (query, key, value), grad_out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = [t.detach().to(torch.bfloat16).requires_grad_() for t in (query, key, value)]
        got = causal_attention(*low, 0.35, torch.bfloat16)
        eager = _eager_attention(*low, 0.35)
    assert got.dtype == torch.bfloat16 and BLOCKED in backward_node_names(got)
    got_grads = torch.autograd.grad(got, low, grad_out.to(torch.bfloat16))
    eager_grads = torch.autograd.grad(eager, low, grad_out.to(torch.bfloat16))
    assert all(g.dtype == torch.bfloat16 for g in got_grads)

    def error(result, reference):
        return ((result.float() - reference).norm() / reference.norm()).item()

    # bf16-sized errors against the exact fp32 attention, and no larger than eager's (the
    # softmax, dS and the sums over blocks are kept in fp32)
    assert error(got, exact) < 1e-2
    assert error(got, exact) <= 1.25 * error(eager, exact)
    for got_grad, eager_grad, exact_grad in zip(got_grads, eager_grads, exact_grads):
        assert error(got_grad, exact_grad) < 2e-2
        assert error(got_grad, exact_grad) <= 1.25 * error(eager_grad, exact_grad)
    # the default stays fp32, whatever the inputs' dtype; so do products too narrow to pay
    assert causal_attention(*low, 0.35).dtype == torch.float32
    narrow = [t[:1] for t in low]
    assert narrow[0].shape[0] * narrow[1].shape[1] * narrow[0].shape[-1] < \
        LOW_PRECISION_MIN_COLUMNS
    assert causal_attention(*narrow, 0.35, torch.bfloat16).dtype == torch.float32


def test_pays_for_long_enough_and_short_enough_queries():
    assert pays_for(torch.empty(16, 4, 256, 32))             # llama-tiny pre-training
    assert not pays_for(torch.empty(1, 4, 64, 32))           # one short sample: SDPA wins
    assert not pays_for(torch.empty(64, 8, MAX_LENGTH + 1, 64))  # probabilities too large
    assert not pays_for(torch.empty(64, 8, 1, 64))           # one position: nothing causal


def _llama(**config):
    # 4 heads of 16 x 256 positions x batch 8: above causal_attention's MIN_WORK
    return tiny_llama(vocab_size=128, hidden_size=64, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, **config)


def _pretraining_batch(rows: int = 8, length: int = 256) -> Batch:
    ids = torch.randint(0, 128, (rows, length + 1), generator=torch.Generator().manual_seed(0))
    return Batch({"input_ids": ids[:, :-1]}, ids[:, 1:], rows * length)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, _ = accumulate_gradients(model, [batch], "lm", CPU, None)
    return loss, {n: p.grad for n, p in model.named_parameters()}


def test_pretraining_rows_attend_by_blocks_with_sdpas_results():
    plain = _llama()
    blocked = copy.deepcopy(plain)
    assert use_packed_attention(blocked, CPU)
    batch = _pretraining_batch()
    logits = blocked(**batch.inputs).logits
    assert BLOCKED in backward_node_names(logits)
    assert BLOCKED not in backward_node_names(plain(**batch.inputs).logits)
    want_loss, want_grads = _loss_and_grads(plain, batch)
    got_loss, got_grads = _loss_and_grads(blocked, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sdpa_where_blocks_would_compute_something_else_or_cost_more():
    model = _llama(attention_dropout=0.1)
    use_packed_attention(model, CPU)
    batch = _pretraining_batch()
    model.train()  # dropout on: SDPA
    assert BLOCKED not in backward_node_names(model(**batch.inputs).logits)
    model.eval()  # no dropout in evaluation: the blocks
    assert BLOCKED in backward_node_names(model(**batch.inputs).logits)
    padded = {**batch.inputs, "attention_mask": torch.ones(8, 256, dtype=torch.long)}
    padded["attention_mask"][0, :3] = 0  # a mask to apply: SDPA
    assert BLOCKED not in backward_node_names(model(**padded).logits)
    short = _pretraining_batch(rows=2, length=64)  # too little work: SDPA
    assert BLOCKED not in backward_node_names(model(**short.inputs).logits)


def test_long_packed_samples_attend_by_blocks_short_ones_by_sdpa():
    module = _llama().model.layers[0].self_attn
    query, key, value = _qkv(2, 8, 4, 256, 32)
    segments = (((0, 200), (200, 250)), ((0, 256),))
    got, _ = packed_sdpa_attention(module, query, key, value, None, segments, scaling=0.2)
    assert BLOCKED in backward_node_names(got)
    # the block-diagonal causal mask over whole rows gives the same (padding aside)
    allowed = torch.zeros(2, 1, 256, 256, dtype=torch.bool)
    for row, spans in enumerate(segments):
        for start, end in spans:
            allowed[row, 0, start:end, start:end] = True
    allowed &= torch.ones(256, 256, dtype=torch.bool).tril()
    allowed[0, 0, 250:, 0] = True  # padding rows: any finite softmax (their outputs are unused)
    want = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=0.2,
                                          enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got[0, :250], want[0, :250], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
