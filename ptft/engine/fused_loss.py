"""Fused linear cross-entropy: the language-modelling loss straight from the last hidden states,
a chunk of rows at a time, with its gradients computed in the same pass.

The plain loss materialises (tokens x vocab) fp32 logits, their log-softmax and, in backward,
a gradient of the same size: for llama-tiny's 16 x 256 batch that is three 128 MiB tensors,
freshly allocated (page faults) and streamed through memory several times. Here each chunk of
rows (8 MiB of logits on a CPU, so it stays in cache; 256 MiB on a GPU) goes through

    logits = h W^T (+ b)          p = softmax(logits)              loss -= log p[target]
    G = p - onehot(target)        dL/dh = G W     dL/dW += G^T h     dL/db += sum(G)

and only dL/dh (the size of the hidden states) and dL/dW (the size of the weight) are kept for
backward, which scales them by the incoming gradient (the loss is a sum, so that is exact). The
matmuls are the same three as the plain path's (6 x vocab x hidden FLOPs per target), nothing
is recomputed, and the full logits never exist. This is the scheme of Liger-Kernel's
FusedLinearCrossEntropy, in plain PyTorch.

Under autocast the matmuls run in the autocast dtype and the softmax in fp32, as in the plain
path; the weight gradient is accumulated in fp32.
"""

from __future__ import annotations

import torch

from ptft.data.batches import IGNORE_INDEX
from ptft.engine import onednn_linear
from ptft.engine.device import matmul_dtype

# fp32 logits per chunk, by device type: on CPUs at least 8 MiB, which stays in cache
# (llama-tiny's 256 rows, measured fastest for it on Zen 5), more for wider models
# (ROWS_PER_HIDDEN); on GPUs 256 MiB keeps the matmuls large enough to be efficient.
CHUNK_LOGIT_BYTES = {"cpu": 2**23}
CHUNK_LOGIT_BYTES_DEFAULT = 2**28
# On a CPU chunks hold at least this many rows per hidden unit, up to CHUNK_LOGIT_BYTES_MAX of
# logits: every chunk adds its weight gradient into the (vocab x hidden) fp32 sum (MKL's addmm_
# in place; oneDNN's product, ptft/engine/onednn_linear.py, and a bf16/fp16 product afresh),
# which with fewer than ~2 x hidden rows moves more bytes than the chunk's logits, and the
# matmuls over few rows run below the CPU's rate even with the weight frozen. Measured, the
# loss alone, llama-small's shapes (512 hidden, 16,384 vocab), 128-row against 1,024-row chunks:
# Zen 5 through oneDNN, 2,048 rows, 474 -> 296-322 ms (its bf16 pre-training step 807 -> 754
# ms); Zen 3 through MKL (AVX2: no oneDNN route there), medians of 6 alternations, 2,048 rows
# 1,232 -> 994 ms, and with the weight frozen (LoRA's 512 answer tokens) 233 -> 181 ms.
# llama-tiny's (128 hidden) stay at 256 rows, the 8 MiB above.
ROWS_PER_HIDDEN = 2
CHUNK_LOGIT_BYTES_MAX = 2**26
SCRATCH_BYTES = 2**22  # a bf16 weight-gradient product is cast up this many bytes at a time


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, all_targets: bool = False) -> torch.Tensor:
    """sum over rows of cross_entropy(hidden @ weight.T + bias, labels), ignoring -100 labels,
    as an fp32 scalar. hidden: (N, H); weight: (V, H); labels: (N,). `all_targets`: the caller
    knows no label is -100 (saves a pass over each chunk)."""
    dtype = matmul_dtype(hidden.device, weight.dtype)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    rows = chunk_rows(hidden.device, weight.shape[0], weight.shape[1])
    if not needs_grad:
        with torch.autocast(hidden.device.type, enabled=False):
            return _chunks(hidden, weight, bias, labels, rows, dtype, all_targets, None)
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, rows, dtype, all_targets)


def chunk_rows(device: torch.device, vocab_size: int, hidden_size: int) -> int:
    """Rows of hidden states per chunk of the loss."""
    chunk_bytes = CHUNK_LOGIT_BYTES.get(device.type, CHUNK_LOGIT_BYTES_DEFAULT)
    rows = chunk_bytes // (4 * vocab_size)
    if device.type == "cpu":
        rows = min(max(rows, ROWS_PER_HIDDEN * hidden_size),
                   CHUNK_LOGIT_BYTES_MAX // (4 * vocab_size))
    return max(1, rows)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows, dtype, all_targets):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = {
            "hidden": torch.empty_like(hidden) if need_h else None,
            "weight": _WeightGradSum(weight) if need_w else None,
            "bias": torch.zeros_like(bias, dtype=torch.float32) if need_b else None,
        }
        with torch.autocast(hidden.device.type, enabled=False):
            loss = _chunks(hidden, weight, bias, labels, rows, dtype, all_targets, grads)
        if need_w:
            grads["weight"] = grads["weight"].total()
        ctx.save_for_backward(*(g for g in grads.values() if g is not None))
        ctx.present = tuple(g is not None for g in grads.values())
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        grad_h, grad_w, grad_b = (next(saved) if present else None for present in ctx.present)
        grad_h = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        if grad_w is not None:  # contiguous, in the weight's dtype, in one pass over the sum
            grad_w = torch.mul(grad_w, grad_loss, out=torch.empty(
                grad_w.shape, dtype=ctx.dtypes[0], device=grad_w.device))
        grad_b = (grad_b * grad_loss).to(ctx.dtypes[1]) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None


def _chunks(hidden, weight, bias, labels, rows: int, dtype: torch.dtype, all_targets: bool,
            grads: dict | None) -> torch.Tensor:
    """The summed loss; with `grads`, also fills grads['hidden'] and accumulates
    grads['weight'] / grads['bias'] (those that are not None)."""
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    # One logits buffer for every chunk: measured ~8% faster than a fresh MKL output each
    # time on a CPU (the 8 MiB block stays where the cache has it).
    # oneDNN writes a fresh block and is faster still: no buffer on that route.
    buffer = None if onednn_linear.applies(hidden, w) else torch.empty(
        min(rows, hidden.shape[0]), w.shape[0], dtype=dtype, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        h = hidden[start:start + rows].to(dtype)
        y = labels[start:start + rows]
        valid = y != IGNORE_INDEX
        target = y.clamp(min=0).unsqueeze(1)
        out = buffer[:h.shape[0]] if buffer is not None else None
        logits = _logits(h, w, b, out).float()  # the buffer itself in fp32; a copy under autocast
        if grads is None:
            nll = -torch.log_softmax(logits, dim=-1).gather(1, target).squeeze(1)
            total += torch.where(valid, nll, 0.0).sum()
            continue
        g, nll = _softmax_and_nll(logits, target, lambda r, h=h: _logits(h[r], w, b))
        total += torch.where(valid, nll, 0.0).sum()
        g.scatter_add_(1, target, -valid.to(g.dtype).unsqueeze(1))
        if not all_targets:
            g.mul_(valid.unsqueeze(1))  # ignored rows contribute nothing
        g = g.to(dtype)
        if grads["hidden"] is not None:
            chunk_grad = grads["hidden"][start:start + rows]
            if onednn_linear.applies(g, w):
                chunk_grad.copy_(onednn_linear.matmul_nt(g, w.t()))
            elif chunk_grad.dtype == dtype:
                torch.mm(g, w, out=chunk_grad)
            else:
                chunk_grad.copy_(g @ w)
        if grads["weight"] is not None:
            grads["weight"].add(g, h)
        if grads["bias"] is not None:
            grads["bias"] += g.float().sum(0)
    return total


def _logits(h, w, b, out=None) -> torch.Tensor:
    if onednn_linear.applies(h, w, b):  # faster than the kept buffer's MKL matmul
        return onednn_linear.matmul_nt(h, w, b)
    if b is None:
        return torch.mm(h, w.t(), out=out) if out is not None else torch.mm(h, w.t())
    return torch.addmm(b, h, w.t(), out=out) if out is not None else torch.addmm(b, h, w.t())


class _WeightGradSum:
    """The output projection's fp32 weight gradient, G^T h summed over the chunks."""

    def __init__(self, weight: torch.Tensor):
        self.like = weight
        self.sum: torch.Tensor | None = None
        # oneDNN computes a (vocab x hidden) G^T h fastest as (h^T G)^T (onednn_linear's
        # weight_grad): that sum is kept as (hidden x vocab) and transposed once at the end.
        self.transposed: torch.Tensor | None = None
        self.scratch: torch.Tensor | None = None  # rows of a low-precision product, in fp32

    def add(self, g: torch.Tensor, h: torch.Tensor) -> None:
        if onednn_linear.applies(g, h) and g.shape[1] > h.shape[1]:
            product = onednn_linear.matmul_nt(h.t(), g.t())
            if self.transposed is None:
                self.transposed = product
            else:
                self.transposed += product
            return
        if onednn_linear.applies(g, h):
            self._add_product(onednn_linear.weight_grad(g, h))
        elif g.dtype == torch.float32 and self.sum is not None:
            self.sum.addmm_(g.t(), h)
        else:
            self._add_product(g.t() @ h)

    def _add_product(self, product: torch.Tensor) -> None:
        if self.sum is None:  # the first chunk's product is the sum: no zeros to fill and add
            self.sum = product.float()
        elif product.dtype == torch.float32 or product.device.type != "cpu":
            self.sum += product
        else:
            # `sum += product` with a bf16 product casts element by element on a CPU
            # (unvectorised: 10.7 ms for llama-small's 16384 x 512, once per chunk). Cast a
            # block of rows into a small fp32 scratch that stays in cache, then add it: two
            # vectorised passes, ~2 ms, and no second weight-sized buffer.
            rows = max(1, SCRATCH_BYTES // (4 * product.shape[1]))
            if self.scratch is None:
                self.scratch = torch.empty(min(rows, product.shape[0]), product.shape[1])
            for start in range(0, product.shape[0], rows):
                block = product[start:start + rows]
                self.sum[start:start + rows] += self.scratch[:block.shape[0]].copy_(block)

    def total(self) -> torch.Tensor:
        if self.transposed is None:
            return self.sum if self.sum is not None else torch.zeros_like(
                self.like, dtype=torch.float32)
        if self.sum is None:
            return self.transposed.t()  # backward's scaling writes it contiguous
        return self.sum.add_(self.transposed.t())


def _softmax_and_nll(logits: torch.Tensor, target: torch.Tensor, logits_of):
    """softmax(logits) (the gradient's main term) and each row's -log p[target]; `logits` may
    be overwritten, `logits_of(rows)` computes those rows' logits again.

    On a CPU one softmax pass gives both, through the log of the picked probability: that saves
    the exp pass over the chunk that log-softmax followed by exp costs (about 2.5% of a
    llama-tiny step). The softmax is written over the logits, in the cache where the matmul
    left them (no fresh 8 MiB block per chunk: the loss alone on llama-tiny's shapes 163 ->
    155 ms). A picked probability below fp32's smallest normal (a loss above ~87 nats: a
    diverged model) has lost its precision; those rows' logits are computed again and their
    loss taken exactly. Finding them reads a flag on the host, free on a CPU but a sync
    elsewhere, so other devices take log-softmax and exp, whose memory bandwidth makes the
    extra pass cheap anyway."""
    if logits.device.type != "cpu":
        log_p = torch.log_softmax(logits, dim=-1)
        nll = -log_p.gather(1, target).squeeze(1)
        return log_p.exp_(), nll  # softmax, in place: the chunk's one (rows x vocab) buffer
    # aten's softmax reads each row (its maximum) before writing it: safe in place
    p = torch._softmax(logits, -1, False, out=logits)
    picked = p.gather(1, target).squeeze(1)
    nll = -picked.log()
    underflow = picked < torch.finfo(torch.float32).tiny
    if underflow.any():
        rows = underflow.nonzero().squeeze(1)
        lost = logits_of(rows).float()
        nll[rows] = torch.logsumexp(lost, dim=-1) - lost.gather(1, target[rows]).squeeze(1)
    return p, nll
