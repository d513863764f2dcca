"""CPU causal attention by query blocks (ptft/engine/causal_attention.py): SDPA's outputs and
gradients, grouped-query heads included, in fp32 under autocast, and used by the attention
ptft installs for CPU runs where it pays (pre-training rows, long packed samples) but not
where it would compute something else (dropout, masks) or cost more (short sequences)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ptft.data.batches import Batch
from ptft.engine.causal_attention import MAX_LENGTH, causal_attention, pays_for
from ptft.engine.objective import accumulate_gradients
from ptft.engine.packed_attention import packed_sdpa_attention, use_packed_attention
from tests.conftest import tiny_llama

CPU = torch.device("cpu")
BLOCKED = "_BlockedCausalAttentionBackward"


def _qkv(batch, heads, kv_heads, length, width, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, length, width)] + [(batch, kv_heads, length, width)] * 2
    return [torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in shapes]


def _backward_nodes(tensor: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


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
    assert BLOCKED in _backward_nodes(got)
    got_grads = torch.autograd.grad(got, (query, key, value), grad_out)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g, w in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():  # the forward-only path keeps nothing for backward, same result
        torch.testing.assert_close(causal_attention(query, key, value, 0.3), got,
                                   rtol=0, atol=0)


def test_fp32_under_autocast():
    query, key, value = _qkv(2, 4, 2, 96, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = causal_attention(query, key, value, 0.35)
        got.float().square().sum().backward()
    assert got.dtype == torch.float32
    want = causal_attention(*(t.detach().float() for t in (query, key, value)), 0.35)
    assert torch.equal(got.detach(), want)
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and t.grad.abs().sum() > 0
               for t in (query, key, value))


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
    assert BLOCKED in _backward_nodes(logits)
    assert BLOCKED not in _backward_nodes(plain(**batch.inputs).logits)
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
    assert BLOCKED not in _backward_nodes(model(**batch.inputs).logits)
    model.eval()  # no dropout in evaluation: the blocks
    assert BLOCKED in _backward_nodes(model(**batch.inputs).logits)
    padded = {**batch.inputs, "attention_mask": torch.ones(8, 256, dtype=torch.long)}
    padded["attention_mask"][0, :3] = 0  # a mask to apply: SDPA
    assert BLOCKED not in _backward_nodes(model(**padded).logits)
    short = _pretraining_batch(rows=2, length=64)  # too little work: SDPA
    assert BLOCKED not in _backward_nodes(model(**short.inputs).logits)


def test_long_packed_samples_attend_by_blocks_short_ones_by_sdpa():
    module = _llama().model.layers[0].self_attn
    query, key, value = _qkv(2, 8, 4, 256, 32)
    segments = (((0, 200), (200, 250)), ((0, 256),))
    got, _ = packed_sdpa_attention(module, query, key, value, None, segments, scaling=0.2)
    assert BLOCKED in _backward_nodes(got)
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
