"""Which device a run uses and at what precision."""

from __future__ import annotations

import contextlib

import torch

from ptft.config.schema import Device, Precision, TrainConfig
from ptft.errors import UsageError


def matmul_dtype(device: torch.device | str, default: torch.dtype) -> torch.dtype:
    """The dtype a matmul on `device` runs in at this point: autocast's where autocast is on,
    else `default` (its inputs' dtype). For code that casts for itself under autocast."""
    device_type = torch.device(device).type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == Device.cuda and not torch.cuda.is_available():
        raise UsageError("train.device=cuda but no CUDA device is visible; use train.device=auto.")
    if cfg.device == Device.cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


# x86 CPU flags of native bf16 arithmetic: AVX512-BF16 dot products (Cooper Lake, Sapphire
# Rapids, Zen 4 and later) and AMX tiles (Sapphire Rapids and later). oneDNN runs bf16 matmuls
# on these at 2-4x the fp32 rate; elsewhere it emulates bf16, slower than fp32.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. `auto` takes bf16 where the hardware runs it
    natively (CUDA with bf16 support; CPUs with AVX512-BF16 or AMX), fp32 elsewhere."""
    if cfg.precision == Precision.bf16:
        return torch.bfloat16
    if cfg.precision != Precision.auto:
        return None
    if device.type == "cuda":
        # Natively: not the emulation torch also counts by default (V100, T4: slower).
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) \
            else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_runs_bf16_natively() else None
    return None


def emulated_bf16_warning(dtype: torch.dtype | None, device: torch.device,
                          cpuinfo: str | None = None) -> str | None:
    """What to tell a user who asked for bf16 (train.precision=bf16) on a CPU that has no native
    bf16 instructions; None where there is nothing to say. Torch then runs bf16 matmuls in
    generic code: on an AVX2 AMD EPYC (Zen 3, 2 threads) a 1024^2 bf16 matmul ran at ~1 GFLOP/s
    against ~100 GFLOP/s in fp32, so such a run takes many times longer than fp32 would.
    `cpuinfo`: /proc/cpuinfo's text (read when not given)."""
    if dtype != torch.bfloat16 or device.type != "cpu" or cpu_runs_bf16_natively(cpuinfo):
        return None
    return ("train.precision=bf16 on a CPU without native bf16 instructions (AVX512-BF16 or "
            "AMX): torch emulates bf16 matmuls here, many times slower than fp32 (~100x measured "
            "on an AVX2 AMD EPYC). train.precision=auto takes fp32 on this CPU.")


def cpu_runs_bf16_natively(cpuinfo: str | None = None) -> bool:
    """Whether this CPU (or the given /proc/cpuinfo text) has native bf16 instructions."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:  # not Linux: no flags to read, so no claim of native bf16
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)
    return False


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
