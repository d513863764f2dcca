"""Which device a run uses and at what precision."""

from __future__ import annotations

import contextlib

import torch

from ptft.config.schema import Device, Precision, TrainConfig
from ptft.errors import UsageError


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == Device.cuda and not torch.cuda.is_available():
        raise UsageError("train.device=cuda but no CUDA device is visible; use train.device=auto.")
    if cfg.device == Device.cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. `auto` takes bf16 only where the hardware
    runs it natively (CUDA with bf16 support); on CPUs fp32 is the safe default."""
    if cfg.precision == Precision.bf16:
        return torch.bfloat16
    if cfg.precision == Precision.auto and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of the run: allocated GPU memory on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
