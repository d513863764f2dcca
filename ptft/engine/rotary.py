"""Rotary position embedding (Llama's apply_rotary_pos_emb, and the models that copy it) as one
autograd function.

transformers rotates the queries and keys as q * cos + rotate_half(q) * sin: a concatenation,
a negation, two products and a sum per tensor, each a pass over a (batch, heads, length, head)
view whose strides are the projection's (the heads are a transposed view), and under bf16
autocast every product mixes bf16 queries with fp32 cos/sin, which torch casts element by
element. Its backward is as many passes again. Here each half of the head is written once:

    out[:h] = x[:h] cos[:h] - x[h:] sin[:h]        out[h:] = x[h:] cos[h:] + x[:h] sin[h:]
    grad[:h] = g[:h] cos[:h] + g[h:] sin[h:]       grad[h:] = g[h:] cos[h:] - g[:h] sin[:h]

in the dtype transformers' result has (the promotion of q's and cos's: fp32 under autocast,
where the queries are cast up once first). The same values to the last bit or one rounding
(a fused multiply-add). Queries and keys of one layer, forward and backward, 2 CPU threads:
llama-tiny's (16 x 4 x 256 x 32) 1.71 -> 0.70 ms, llama-small's (8 x 8 x 256 x 64, 4 key heads)
2.90 -> 1.12 ms; nothing activation-sized is kept for backward (transformers keeps the rotated
halves).

It replaces the module-level function of the modeling files in MODULES, which their attention
classes call: a process-wide change, which the executor undoes (`restore`) when the run ends.
Where the fused form does not apply (cos/sin that need gradients, an odd head size, queries and
keys of different dtypes, torch.compile tracing) transformers' own function runs."""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

MODULES = ("transformers.models.llama.modeling_llama",
           "transformers.models.mistral.modeling_mistral",
           "transformers.models.qwen2.modeling_qwen2",
           "transformers.models.qwen3.modeling_qwen3")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           inverse: bool = False) -> torch.Tensor:
    """x rotated by (cos, sin) over its last dimension's two halves, as rotate_half does it; or,
    `inverse`, the gradient of that rotation applied to x. All three in one dtype; cos and sin
    broadcast against x. A fresh, contiguous result."""
    half = x.shape[-1] // 2
    out = torch.empty(torch.broadcast_shapes(x.shape, cos.shape), dtype=x.dtype,
                      device=x.device)
    x1, x2, out1, out2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    cos1, cos2, sin1, sin2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    torch.mul(x1, cos1, out=out1)
    torch.mul(x2, cos2, out=out2)
    if inverse:
        out1.addcmul_(x2, sin2)
        out2.addcmul_(x1, sin1, value=-1)
    else:
        out1.addcmul_(x2, sin1, value=-1)
        out2.addcmul_(x1, sin2)
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = q.dtype, k.dtype
        return tuple(rotate(x.to(cos.dtype), cos, sin) for x in (q, k))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        grads = []
        for grad, dtype, needed in zip((grad_q, grad_k), ctx.dtypes, ctx.needs_input_grad):
            grads.append(rotate(grad.to(cos.dtype), cos, sin, inverse=True).to(dtype)
                         if needed and grad is not None else None)
        return grads[0], grads[1], None, None


class _FusedRotary:
    """A drop-in for transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)."""

    def __init__(self, original: Callable):
        self.original = original

    def __call__(self, q, k, cos, sin, unsqueeze_dim=1):
        if cos.requires_grad or sin.requires_grad or q.shape[-1] % 2 or q.dtype != k.dtype \
                or torch.compiler.is_compiling():
            return self.original(q, k, cos, sin, unsqueeze_dim)
        dtype = torch.promote_types(q.dtype, torch.promote_types(cos.dtype, sin.dtype))
        cos = cos.unsqueeze(unsqueeze_dim).to(dtype)
        sin = sin.unsqueeze(unsqueeze_dim).to(dtype)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            return _Rotary.apply(q, k, cos, sin)
        return rotate(q.to(dtype), cos, sin), rotate(k.to(dtype), cos, sin)


_REPLACED: dict = {}  # modeling module -> transformers' own function


def use_fused_rotary(model: torch.nn.Module) -> list[str]:
    """Point the modeling modules (of MODULES) that `model`'s layers come from at the fused
    function; restore() puts transformers' back. Returns the modules' names."""
    names = sorted({type(m).__module__ for m in model.modules()} & set(MODULES))
    for name in names:
        module = importlib.import_module(name)
        current = module.apply_rotary_pos_emb
        if not isinstance(current, _FusedRotary):
            _REPLACED[module] = current
            module.apply_rotary_pos_emb = _FusedRotary(current)
    return names


def restore() -> None:
    """transformers' own functions back wherever use_fused_rotary replaced them."""
    while _REPLACED:
        module, original = _REPLACED.popitem()
        module.apply_rotary_pos_emb = original
