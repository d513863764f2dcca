"""LoRA training as one matmul over the merged weight: y = x (W + s B A)^T.

peft computes a LoRA projection as base(x) + s * B(A(x)): on top of the frozen base matmul,
two thin matmuls over the whole activation, a (tokens x out) update and a sum, and in
backward the same again plus a second input gradient that autograd adds to the base's. The
low-rank factors are tiny next to the activations once a batch holds more tokens than the
layer has features (thousands against hundreds here), so ptft folds them into the weight
instead: forming W + s B A touches one weight-sized block, and the forward and the input
gradient are each the one matmul that the frozen base needs anyway. What LoRA still has to
read the activations for is its own gradients, s (G B)^T x for A and s G^T (x A^T) for B.

    llama-small LoRA step, 8 x 512 tokens, 2 CPU threads, in-process A/B against peft's path
    with the update added in place: fp32 3.99 -> 3.58 s, bf16 1.70 -> 1.56 s.

The result is the same sum rounded in another order (fp32: ~1e-7 relative); under autocast the
merged weight is rounded to the autocast dtype once, as the base weight itself is. That
rounds the update at the weight's precision, not the output's as peft's sum does, and made no
difference to training: 300 LoRA steps on docstrings from the default pre-trained llama-tiny,
bf16 autocast, ended at eval loss 5.0660 either way (fp32: 5.0661), equal at every
evaluation to the fourth decimal.

Its two activation-sized matmuls take ptft's oneDNN route where that is on
(ptft/engine/onednn_linear.py: fp32 on CPUs where oneDNN outruns MKL).

Only for training steps: a forward without gradients (evaluation, generation) costs no
backward, and for a few tokens the weight-sized merge would cost more than the thin
matmuls it saves, so those keep the per-token path (ptft/methods/lora_linear.py)."""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

from ptft.engine import onednn_linear, shared_copies
from ptft.engine.device import matmul_dtype


def merged_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """F.linear(x, weight, bias) + scaling * x A^T B^T, differentiable in x, A and B (the
    base weight and bias are frozen)."""
    # 2-D inside the function, reshaped outside: an output that is a view made inside a custom
    # function could not be changed in place afterwards.
    if x.dim() == 2:
        return _MergedWeightLora.apply(x, weight, bias, lora_A, lora_B, scaling)
    out = _MergedWeightLora.apply(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B,
                                  scaling)
    return out.view(*x.shape[:-1], weight.shape[0])


def _autocast_off(device_type: str):
    """The dtypes here are chosen explicitly, so autocast must not cast again (the merge in
    particular is computed once, in the matmul's dtype)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _merged(weight, lora_A, lora_B, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.addmm(weight.to(dtype), lora_B.to(dtype), lora_A.to(dtype), alpha=scaling)


class _MergedWeightLora(torch.autograd.Function):
    """The merged-weight projection of a 2-D x (tokens, in)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        dtype = matmul_dtype(x.device, x.dtype)
        # Under autocast the projections that read one input (q, k, v) share one cast of it,
        # and it is that copy backward keeps: half the bytes of the fp32 input, no second cast.
        inputs = shared_copies.cast(x, dtype)
        with _autocast_off(x.device.type):
            out = onednn_linear.matmul_nt(inputs, _merged(weight, lora_A, lora_B, scaling, dtype),
                                          None if bias is None else bias.to(dtype))
        # The merged weight is not kept: backward forms it again (weight-sized, cheap), which
        # keeps LoRA's memory at the frozen weights plus the factors.
        ctx.save_for_backward(inputs, weight, lora_A, lora_B)
        ctx.scaling, ctx.dtype, ctx.x_dtype = scaling, dtype, x.dtype
        return out

    @staticmethod
    @once_differentiable  # oneDNN's op has no derivative: a second order must fail, not lie
    def backward(ctx, grad_out):
        inputs, weight, lora_A, lora_B = ctx.saved_tensors  # inputs: (tokens, in), in dtype
        scaling, dtype = ctx.scaling, ctx.dtype
        grad_x = grad_A = grad_B = None
        with _autocast_off(inputs.device.type):
            a, b = lora_A.to(dtype), lora_B.to(dtype)
            grads = grad_out  # (tokens, out)
            grad_A, grad_B = _factor_grads(grads, inputs, a, b, *ctx.needs_input_grad[3:5])
            if grad_A is not None:
                grad_A = grad_A.mul_(scaling).to(lora_A.dtype)
            if grad_B is not None:
                grad_B = grad_B.mul_(scaling).to(lora_B.dtype).contiguous()
            if ctx.needs_input_grad[0]:
                merged = _merged(weight, lora_A, lora_B, scaling, dtype)
                grad_x = onednn_linear.matmul_nt(grads, merged.t()).to(ctx.x_dtype)
        return grad_x, None, None, grad_A, grad_B, None


def _factor_grads(grads: torch.Tensor, inputs: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  need_a: bool, need_b: bool):
    """(G B)^T X and G^T (X A^T), unscaled (None where not needed): G (tokens x out) the output
    gradient, X (tokens x in) the input, A (r x in), B (out x r)."""
    if onednn_linear.applies(grads, inputs, a, b):
        # oneDNN: the thin (tokens x r) products first, then the reductions over tokens
        # (llama-small's shapes, both factors: 3.8 -> 1.5 ms against the MKL form below).
        grad_a = onednn_linear.weight_grad(onednn_linear.matmul_nt(grads, b.t()), inputs) \
            if need_a else None
        grad_b = onednn_linear.weight_grad(grads, onednn_linear.matmul_nt(inputs, a)) \
            if need_b else None
        return grad_a, grad_b
    # MKL: both as (r x tokens) @ (tokens x features), 2-5x faster than (features x tokens)
    # @ (tokens x r).
    grad_a = (b.t() @ grads.t()) @ inputs if need_a else None
    grad_b = ((a @ inputs.t()) @ grads).t() if need_b else None
    return grad_a, grad_b
