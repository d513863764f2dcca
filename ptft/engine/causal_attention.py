"""Causal self-attention on a CPU by blocks of queries and batched matmuls.

PyTorch's CPU flash-attention kernel computes the causal half of softmax(Q K^T * s) V well
below the matmul rate at small head sizes, and its backward more so: llama-tiny's attention
(16 x 4 heads x 256 x 32) takes 14-17 ms a layer forward and backward, 19 ms under bf16
autocast. Here the queries are cut into blocks of 64 rows; each block attends to the keys up
to its own end, so the blocks above the diagonal are never computed (at 4 blocks 10/16 of the
square is computed for the causal 8/16, where one matmul over the whole square computes all
16), and every product is one batched GEMM over all (batch, head) pairs:

    forward, per block     S = Q_b K_{:b}^T * s + causal    P = softmax(S)    O_b = P V_{:b}
    backward, per block    dV_{:b} += P^T dO_b    dP = dO_b V_{:b}^T
                           dS = P * (dP - rowsum(dO * O))   dQ_b = dS K_{:b} * s
                           dK_{:b} += dS^T Q_b * s

(rowsum(dO * O) equals rowsum(dP * P), FlashAttention's shortcut: one pass over D columns, not
the block's keys). The same attention, 2 CPU threads, forward + backward:
llama-tiny's shape 13.9 -> 9.9 ms, llama-small's (8 x 8 x 256 x 64) 26.8 -> 16.1 ms; under
bf16 autocast (against the bf16 flash kernel) 18.8 -> 10.9 and 26.2 -> 17.8 ms.

The products run in the dtype autocast would give them (bf16 under bf16 autocast, as an eager
attention's matmuls run there: transformers' eager attention, nanoGPT's), the softmax in fp32,
its probabilities rounded to the product dtype for P V (as eager attention does), the score
gradient dS in fp32 and the key and value gradients summed over the blocks in fp32. On this
CPU bf16 batched matmuls run up to ~2.5x the fp32 rate (~450 against ~185 GFLOP/s), but cost
more per call: narrow ones (few sequences and heads, a small head size) stay in fp32
(LOW_PRECISION_MIN_COLUMNS). bf16 pre-training steps (medians, two interleaved runs each):
llama-tiny 160 -> 145 ms, llama-small 747 -> 692 ms. Without autocast the products are the
inputs' dtype (fp32 in an fp32 run, SDPA's results to 1e-5).

The price of blocks is memory: backward keeps each block's probabilities, about T^2 / 2 values
per (batch, head), where flash keeps one float per query. Sequences longer than MAX_LENGTH go
to SDPA.

Grouped-query attention needs no copies of keys and values: the query heads that share one
key/value head are stacked into one block of rows.
"""

from __future__ import annotations

import functools

import torch

BLOCK_ROWS = 64
"""Query positions per block (each block's matmuls have this many rows per query head sharing
a key/value head): measured best at 4 blocks for 256 positions and 8 for 512 (fewer leave more
masked work, more make the matmuls too thin)."""
MAX_LENGTH = 512
"""Longest sequence attended here; longer ones go to SDPA, whose memory does not grow with
the square of the length (at 512 the kept probabilities are ~0.6 MB per batch row and head)."""
LOW_PRECISION_MIN_COLUMNS = 1024
"""bf16 (or fp16) products only where the batched matmuls have at least this many columns of
head size across their batch, (batch x key/value heads) x head size: below it oneDNN's bf16
kernel spends longer per call than MKL's fp32 one saves. Forward and backward, 2 CPU threads,
bf16 time / fp32 time: 8 heads of 64 (4 key/value heads) at 128 positions, batch 1 1.12, batch
4 0.71, batch 16 0.62; 4 heads of 32, 256 positions, batch 4 1.00, batch 16 0.85."""
MIN_WORK = 6_000_000
"""Smallest batch x heads x length^2 x head size attended here: below it the flash kernel's
lower overhead wins (one 192-token sample of 4 heads of 32: 0.49 against 0.52 ms forward and
backward; 256 tokens: 0.81 against 0.76 ms; 8 heads of 64 at 100 tokens: 0.60 against 0.51)."""


def pays_for(query: torch.Tensor) -> bool:
    """Whether causal self-attention of this (B, H, T, D) query runs here rather than in SDPA:
    long enough for the blocks to pay, short enough for their memory."""
    batch, heads, length, width = query.shape
    return 1 < length <= MAX_LENGTH and batch * heads * length * length * width >= MIN_WORK


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """softmax(query key^T * scale + causal mask) value. query (B, H, T, D); key (B, H_kv, T,
    D) and value (B, H_kv, T, D_v) with H a multiple of H_kv. The products run in `dtype`
    where they are wide enough for a lower precision to pay (LOW_PRECISION_MIN_COLUMNS), else
    in fp32; the softmax in fp32. Returns (B, H, T, D_v) in the dtype of the products."""
    if dtype != torch.float32 and query.device.type == "cpu" and \
            query.shape[0] * key.shape[1] * query.shape[-1] < LOW_PRECISION_MIN_COLUMNS:
        dtype = torch.float32
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    with torch.autocast(query.device.type, enabled=False):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            return _BlockedCausalAttention.apply(query, key, value, scale)
        return _forward(query, key, value, scale, keep=None)


def _blocks(length: int) -> list[tuple[int, int]]:
    count = max(1, length // BLOCK_ROWS)
    bounds = [length * i // count for i in range(count + 1)]
    return list(zip(bounds, bounds[1:]))


@functools.lru_cache(maxsize=64)
def _diagonal_mask(rows: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive causal mask of a block's own keys: -inf above the diagonal. (Keys before
    the block are all visible; cached by size and dtype, a few KB each.)"""
    return torch.full((rows, rows), float("-inf"), dtype=dtype).triu_(1)


def _grouped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """(B*H_kv, G, T, D) queries and (B*H_kv, T, D) keys and values."""
    batch, heads, length, _ = query.shape
    kv_heads = key.shape[1]
    return (query.reshape(batch * kv_heads, heads // kv_heads, length, query.shape[-1]),
            key.reshape(batch * kv_heads, length, key.shape[-1]),
            value.reshape(batch * kv_heads, length, value.shape[-1]))


def _rows(grouped: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Positions start..end of every head of a group, as one (B*H_kv, G*(end-start), D) block."""
    pairs, groups, _, width = grouped.shape
    return grouped[:, :, start:end].reshape(pairs, groups * (end - start), width)


def _forward(query, key, value, scale: float, keep: list | None) -> torch.Tensor:
    grouped_q, keys, values = _grouped(query, key, value)
    pairs, groups, length, _ = grouped_q.shape
    out = values.new_empty(pairs, groups, length, values.shape[-1])
    for start, end in _blocks(length):
        rows = _rows(grouped_q, start, end)
        scores = torch.baddbmm(rows.new_empty(()), rows, keys[:, :end].transpose(1, 2),
                               beta=0, alpha=scale)
        scores.view(pairs, groups, end - start, end)[..., start:].add_(
            _diagonal_mask(end - start, scores.dtype))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        out[:, :, start:end] = torch.bmm(probs, values[:, :end]).view(
            pairs, groups, end - start, -1)
        if keep is not None:
            keep.append(probs)
    return out.view(*query.shape[:3], values.shape[-1])


class _BlockedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, scale):
        probs: list[torch.Tensor] = []
        out = _forward(query, key, value, scale, keep=probs)
        ctx.save_for_backward(query, key, value, out, *probs)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _backward(ctx, grad_out.to(ctx.saved_tensors[0].dtype))


def _backward(ctx, grad_out):
    query, key, value, out, *probs = ctx.saved_tensors
    scale, dtype = ctx.scale, query.dtype
    low = dtype != torch.float32
    grouped_q, keys, values = _grouped(query, key, value)
    pairs, groups, length, _ = grouped_q.shape
    grad_out = grad_out.reshape(pairs, groups, length, -1)
    # rowsum(dP * P) per query, from the outputs: (pairs, groups, length, 1), in fp32
    row_terms = (grad_out.float() * out.view(grad_out.shape).float()).sum(-1, keepdim=True)
    grad_q = torch.empty_like(grouped_q)
    grad_k = grad_v = None
    # The last block attends to every key: its products start the key and value gradients,
    # the earlier blocks' add into their prefixes (in fp32).
    for (start, end), p in reversed(list(zip(_blocks(length), probs))):
        g = _rows(grad_out, start, end)
        grad_scores = torch.bmm(g, values[:, :end].transpose(1, 2))
        if low:
            grad_scores = grad_scores.float().sub_(_rows(row_terms, start, end)).mul_(
                p.float()).to(dtype)
        else:
            grad_scores.sub_(_rows(row_terms, start, end)).mul_(p)
        grad_q[:, :, start:end] = torch.bmm(grad_scores, keys[:, :end]).mul_(scale).view(
            pairs, groups, end - start, -1)
        block_v = torch.bmm(p.transpose(1, 2), g)
        block_k = torch.bmm(grad_scores.transpose(1, 2), _rows(grouped_q, start, end))
        if grad_k is None:
            grad_v, grad_k = block_v.float(), block_k.float().mul_(scale)
        else:
            grad_v[:, :end] += block_v.float()
            grad_k[:, :end].add_(block_k.float(), alpha=scale)
    return (grad_q.view(query.shape), grad_k.to(dtype).view(key.shape),
            grad_v.to(dtype).view(value.shape), None)
