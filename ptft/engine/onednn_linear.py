"""fp32 projections on a CPU through oneDNN, on machines where it outruns MKL.

torch sends an fp32 CPU matmul to MKL. MKL picks its kernels by CPU vendor, and on AMD
processors it runs its AVX2 code even where the core executes AVX-512 at full width: on this
project's machine (AMD EPYC, Zen 5, 2 threads) a 2048^3 matmul reaches ~210 GFLOP/s through
torch.mm and ~470 GFLOP/s through oneDNN (which torch also ships, and already uses for bf16),
with the same fp32 results (rounded in another order). The shapes of a training step, same
machine, GFLOP/s through MKL -> oneDNN:

    (4096 x 128) @ (128 x 512)      forward / input gradient      210 -> 455
    (4096 x 1376) @ (1376 x 512)    forward / input gradient      213 -> 482
    (512 x 4096) @ (4096 x 128)     weight gradient               196 -> 353
    (256 x 128) @ (128 x 8192)      a chunk of the loss's logits  203 -> 477

On Intel CPUs MKL runs AVX-512 itself and the two are level, so the route is taken only where
the CPU matmul probe measured oneDNN clearly faster (ptft/engine/flops.py, cached per machine);
the probe's peak is then oneDNN's rate, so MFU stays a fraction of what the machine can do.

The entry point is torch's own oneDNN linear op (mkldnn::_linear_pointwise, what inductor
calls for CPU linears), which has no backward: `linear` wraps it in an autograd function whose
input and weight gradients are the same op on transposed views (the op reads its input through
any strides; a transposed weight operand it copies, once per call). `use_onednn_linears` sends
a model's nn.Linear and GPT-2 Conv1D layers through it; the fused loss and LoRA's merged-weight
layer call `matmul_nt` and `weight_grad` themselves. Anything else (autocast on, another dtype
or device, a torch without the op, the route switched off) goes to F.linear as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ptft.engine import shared_copies

_ROUTE = {"on": False}


def available() -> bool:
    """Whether this torch has the oneDNN linear op."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def route_fp32_linears(on: bool) -> None:
    """Send fp32 CPU projections through oneDNN (True) or leave them to torch (False). A
    process-wide switch, like torch.backends' own: the executor sets it from the probe."""
    _ROUTE["on"] = bool(on) and available()


def routed() -> bool:
    return _ROUTE["on"]


def onednn_outruns_torch(rates: dict[str, float], margin: float = 1.1) -> bool:
    """Whether fp32 projections on this CPU should take the oneDNN route, from its fp32
    `cpu_matmul_rates`: oneDNN measured at least `margin` times torch.mm's rate (AMD CPUs with
    full-width AVX-512, where MKL runs AVX2)."""
    return rates.get("onednn", 0.0) >= margin * rates["torch"]


def route_model(model: torch.nn.Module, fp32_cpu_rates: dict[str, float] | None,
                compiled: bool, resumed: bool | None = None) -> bool:
    """Turn the route on for an fp32 CPU training run where the CPU matmul probe's rates
    (`fp32_cpu_rates`; None for other runs: under autocast torch already uses oneDNN) favour
    oneDNN, and send `model`'s projections through it; off otherwise. A compiled model is left
    to the compiler. `resumed`: the route of the checkpoint a run resumes from (None for a new
    run), which wins over the rates. Returns whether the route is on."""
    on = bool(fp32_cpu_rates) and not compiled and available() and (
        onednn_outruns_torch(fp32_cpu_rates) if resumed is None else resumed)
    route_fp32_linears(on)
    if on:
        use_onednn_linears(model)
    return on


def applies(*tensors: torch.Tensor | None) -> bool:
    """Whether a matmul over `tensors` (None: an absent bias) takes the oneDNN route: route on,
    autocast off (it picks its own dtype and kernels), all plain, non-empty fp32 CPU tensors."""
    if not _ROUTE["on"] or torch.is_autocast_enabled("cpu"):
        return False
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32
                             and t.layout == torch.strided and t.numel() > 0) for t in tensors)


def matmul_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b^T (+ bias), no autograd: a (..., k), b (n, k). Views (b = w.t() and the like) are
    read through their strides."""
    if applies(a, b, bias):
        return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")
    return F.linear(a, b, bias)


def weight_grad(grad_out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """grad_out^T @ inputs, (n x t) @ (t x k), the weight gradient of a projection (2-D
    operands). oneDNN reduces over tokens from a contiguous transposed copy of one operand
    (either side runs at the same speed once copied; handing it a transposed view makes it copy
    more slowly inside). The inputs' copy is the one taken: projections that read one input (q,
    k, v; gate, up) share it (ptft/engine/shared_copies.py), so it costs one copy per input
    rather than one per output gradient. Only inputs more than twice as wide as the gradient (a
    down projection) have the gradient copied instead."""
    if not applies(grad_out, inputs):
        return grad_out.t() @ inputs
    if inputs.shape[1] <= 2 * grad_out.shape[1]:
        return matmul_nt(shared_copies.transposed(inputs), grad_out.t()).t()
    return matmul_nt(grad_out.t().contiguous(), inputs.t())


class _OneDnnLinear(torch.autograd.Function):
    """x @ W^T + b for a 2-D x. (The caller reshapes: an output that is a view made inside a
    custom function cannot be changed in place, and peft adds LoRA's update in place.)"""

    @staticmethod
    def forward(ctx, x, weight, bias):
        # Only what backward reads: a frozen weight needs no input, a frozen input no weight.
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None,
                              weight if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        return matmul_nt(x, weight, bias)

    @staticmethod
    @once_differentiable  # oneDNN's op has no derivative: a second order must fail, not lie
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul_nt(grad_out, weight.t())
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(grad_out, x).contiguous()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through oneDNN where `applies` (differentiable)."""
    if not applies(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias)):
        if x.dim() == 2:
            return _OneDnnLinear.apply(x, weight, bias)
        out = _OneDnnLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    return matmul_nt(x, weight, bias)


class _RoutedForward:
    """The forward `use_onednn_linears` gives a layer: a callable object rather than a bound
    function, so that a model pickles (torch.save of the whole module) and deep-copies with it."""

    def __init__(self, module: torch.nn.Module, stored_transposed: bool):
        self.module, self.stored_transposed = module, stored_transposed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.module.weight
        # GPT-2's Conv1D stores its weight (in, out) and computes x @ W + b
        return linear(x, weight.t() if self.stored_transposed else weight, self.module.bias)


def use_onednn_linears(model: torch.nn.Module) -> int:
    """Give every plain nn.Linear (and GPT-2 Conv1D) of `model` a forward through `linear`
    (an instance attribute: the class, names and state dict stay as they are; subclasses such
    as peft's LoRA layers keep their own forward). Returns how many layers it changed."""
    changed = 0
    for module in model.modules():
        if "forward" in vars(module):
            continue
        if type(module) is torch.nn.Linear:
            module.forward = _RoutedForward(module, stored_transposed=False)
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            module.forward = _RoutedForward(module, stored_transposed=True)
        else:
            continue
        changed += 1
    return changed
