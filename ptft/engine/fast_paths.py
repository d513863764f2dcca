"""What ptft swaps into a model before training, for speed, and the process-wide switches it
puts back afterwards.

Each swap keeps the model's classes, parameter names and state dict, computes what the
original computes (bit-equal forwards, gradients to rounding), and records itself in
summary.json under the key below:

    packed_attention  packed SFT samples attend one at a time; causal rows by query blocks on a
                      CPU (ptft/engine/packed_attention.py, causal_attention.py)
    fused_rms_norms   Llama-style RMSNorm as one autograd function (ptft/engine/rms_norm.py)
    fused_rotary      rotary embedding as one autograd function (ptft/engine/rotary.py)
    onednn_linears    fp32 CPU projections through oneDNN where the matmul probe measured it
                      faster than MKL (ptft/engine/onednn_linear.py)

Under train.compile none is taken: the compiler fuses on its own, and would recompile for each
packed batch shape."""

from __future__ import annotations

import torch

from ptft.engine import onednn_linear, rotary
from ptft.engine.packed_attention import use_packed_attention
from ptft.engine.rms_norm import use_fused_rms_norms


def use_fast_paths(model: torch.nn.Module, device: torch.device, compiled: bool,
                   fp32_cpu_rates: dict[str, float] | None,
                   resumed_onednn_route: bool | None = None) -> dict:
    """Swap the fast paths into `model` (on `device`; `fp32_cpu_rates`: the CPU probe's, for an
    fp32 CPU run, else None; `resumed_onednn_route`: the oneDNN route of the checkpoint being
    resumed, None for a new run). Returns what was taken, for the summary."""
    return {
        "packed_attention": not compiled and use_packed_attention(model, device),
        "fused_rms_norms": 0 if compiled else use_fused_rms_norms(model),
        "fused_rotary": not compiled and bool(rotary.use_fused_rotary(model)),
        "onednn_linears": onednn_linear.route_model(model, fp32_cpu_rates, compiled,
                                                    resumed_onednn_route),
    }


def process_switches() -> bool:
    """The process-wide state use_fast_paths may change beyond the model (the oneDNN route
    switch), read before a run, for restore_process_switches."""
    return onednn_linear.routed()


def restore_process_switches(before: bool) -> None:
    """Put back what use_fast_paths changed beyond the model: the oneDNN route switch as
    process_switches() read it, and transformers' own rotary function."""
    onednn_linear.route_fp32_linears(before)
    rotary.restore()
