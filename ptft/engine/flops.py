"""Model FLOPs utilisation (MFU): the FLOPs a training step needs, and what the device can do.

FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's estimate_mfu), counted
from the model's own modules rather than from a parameter count:

    per input token   sum over the matmul weights of the layers (nn.Linear, GPT-2's Conv1D,
                      LoRA and adapter projections included) of k x (in x out),
                      k = 6 for a trained weight (2 forward + 2 input gradient + 2 weight
                      gradient), k = 4 for a frozen one (no weight gradient: LoRA, adapters),
                      + 12 x L x (H x Q) x T for attention (QK^T and AV, forward and backward;
                      L layers, H query heads of size Q, the PaLM convention that ignores the
                      causal mask). T is the length of the sequence the token attends within:
                      train.seq_len for a pre-training block, a packed SFT sample's own length
                      (its attention is computed sample by sample), a padded row's unpadded
                      length; so a sequence of n tokens costs 12 x L x (H x Q) x n^2.
    per target token  the output projection (lm_head): k x vocab x hidden. It is counted even
                      when it shares its weight with the input embedding: tied or not, the
                      matmul is computed. It is charged per token whose prediction is trained
                      (every token when pre-training; the response tokens of an SFT sample), so
                      logits a loss never reads (padding, masked prompts) earn no credit.
    not counted       the input embedding (a table lookup, no matmul), norms, activations,
                      softmax and the optimizer: small next to the matmuls.

So pre-training a dense model costs 6N + 12LHQT per token with N the matmul weights including
the output projection: nanoGPT's 6N counts the tied embedding as N for the same reason.

MFU = achieved FLOPs per second / the device's peak: a table of dense bf16/fp16/tf32/fp32
figures for known NVIDIA GPUs (looked up by torch.cuda.get_device_name), and on a CPU a peak
measured once by a short matmul probe and cached on disk (keyed by CPU model, thread count,
torch version and dtype; a probe taken while other processes kept the cores busy is used for
that run only, not cached). PTFT_PEAK_FLOPS=<FLOP/s> overrides both. For fp32 the probe times
both matmul libraries torch ships (MKL through torch.mm, oneDNN through its linear op) and the
peak is the faster one's: on AMD CPUs with full-width AVX-512 oneDNN runs about twice as fast
as MKL (ptft/engine/onednn_linear.py), and a peak taken from MKL alone would let MFU count
against half of what the machine does.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ptft.engine import onednn_linear
from ptft.engine.device import cpu_runs_bf16_natively

PEAK_ENV = "PTFT_PEAK_FLOPS"
PROBE_FORMAT = 2  # bump when the probe changes: cached peaks are then measured again

# Dense peak FLOP/s (no structured sparsity) from NVIDIA's data sheets, by the name that
# torch.cuda.get_device_name reports (lower case). First match wins: more specific names first.
# fp32 is the CUDA-core figure; tf32 applies when torch allows TF32 matmuls.
GPU_PEAKS: list[tuple[tuple[str, ...], dict[str, float]]] = [
    (("h200", "nvl"), {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (("h200",), {"bf16": 989e12, "fp16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    (("h100", "nvl"), {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (("h100", "pcie"), {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    (("h100",), {"bf16": 989e12, "fp16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM
    (("gh200",), {"bf16": 989e12, "fp16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    (("a100",), {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (("a10g",), {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (("a10",), {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (("l40s",), {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (("l4",), {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (("v100",), {"fp16": 125e12, "fp32": 15.7e12}),  # no bf16 tensor cores
    (("t4",), {"fp16": 65e12, "fp32": 8.1e12}),
    (("4090",), {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    (("3090",), {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
]

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ---- FLOPs per token -------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingFlops:
    """FLOPs of one training step, per token: see the module docstring for what is counted."""

    per_token: float
    """Every input token: the layers' matmuls."""
    per_target: float
    """Every token whose next-token prediction is trained: the output projection."""
    per_attended: float = 0.0
    """Attention, per (query, key) pair of a sequence, 12 x L x (H x Q): a sequence of n
    tokens costs per_attended x n^2 (n^2, not n(n+1)/2: the PaLM convention)."""
    seq_len: int = 0
    """The training sequence length: a full block's n."""

    @property
    def per_block_token(self) -> float:
        """A pre-training token (an input and a target of a full block): the usual '6N +
        12LHQT' figure."""
        return self.per_token + self.per_target + self.per_attended * self.seq_len

    def step(self, tokens: float, targets: float, attended: float | None = None) -> float:
        """FLOPs to train on `tokens` input tokens of which `targets` carry loss; `attended`:
        the sum of n^2 over the sequences that attend within themselves (attended_pairs),
        None for full blocks of seq_len. A packed SFT row of short samples attends sample by
        sample, so charging it the row's length would credit attention never computed."""
        attended = tokens * self.seq_len if attended is None else attended
        return self.per_token * tokens + self.per_target * targets + self.per_attended * attended


def training_flops(model: torch.nn.Module, seq_len: int) -> TrainingFlops:
    """Training FLOPs per token of `model` (a transformers model, optionally under peft, our
    adapters, DDP or torch.compile) at sequence length `seq_len`."""
    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    per_token = per_target = 0.0
    for module in base.modules():
        shape = matmul_shape(module)
        if shape is None:
            continue
        weight = module.weight
        k = 6.0 if weight.requires_grad else 4.0
        if module is head:
            per_target += k * shape[0] * shape[1]
        else:
            per_token += k * shape[0] * shape[1]
    config = getattr(base, "config", None)
    per_attended = attention_flops_per_pair(config) if config is not None else 0.0
    return TrainingFlops(per_token, per_target, per_attended, seq_len)


def attention_flops_per_pair(config) -> float:
    """12 x L x (H x Q): QK^T and AV, each 2 x (H x Q) FLOPs per (query, key) pair forward,
    2x that backward, in every layer."""
    config = getattr(config, "get_text_config", lambda: config)()
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (layers and heads and hidden):
        return 0.0
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return 12.0 * layers * heads * head_dim


def matmul_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) of a dense projection, or None."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2: weight (in, out)
        return tuple(module.weight.shape)  # type: ignore[return-value]
    return None


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under torch.compile, DDP/FSDP wrappers and peft."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "get_base_model") and model.get_base_model() is not model:
            model = model.get_base_model()
        else:
            return model


# ---- device peak -----------------------------------------------------------------------

def device_peak_flops(device: torch.device | str, dtype: torch.dtype | None = None,
                      cache_dir: str | Path | None = None,
                      cpu_rates: dict[str, float] | None = None) -> float | None:
    """Peak dense matmul FLOP/s of `device` at `dtype` (None: fp32). CUDA: the data-sheet table
    (None for an unknown GPU); CPU: the fastest route of `cpu_matmul_rates` (measured once,
    cached; `cpu_rates`: those rates, already read), at fp32's rate for bf16 where the CPU
    only emulates it (cpu_peak_dtype). PTFT_PEAK_FLOPS in the environment overrides both."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV])
    device = torch.device(device)
    dtype = dtype or torch.float32
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), dtype)
    if device.type != "cpu":
        return None
    return max((cpu_rates or cpu_matmul_rates(cpu_peak_dtype(dtype), cache_dir)).values())


def cpu_peak_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype whose matmul rate is this CPU's peak for a run in `dtype`: fp32 for bf16 on a
    CPU that only emulates it (no AVX512-BF16 or AMX). There fp32 is the fastest the machine
    multiplies (bf16 ran at ~1 GFLOP/s against ~100 on an AVX2 EPYC), so MFU says how far the
    run is from the machine's limit, and the bf16 probe, which would take minutes, is not run."""
    if dtype == torch.bfloat16 and not cpu_runs_bf16_natively():
        return torch.float32
    return dtype


def cpu_matmul_rates(dtype: torch.dtype | None = None,
                     cache_dir: str | Path | None = None) -> dict[str, float]:
    """This CPU's matmul FLOP/s at `dtype` by route ('torch': torch.mm, i.e. MKL for fp32;
    'onednn': ptft/engine/onednn_linear.py, fp32 only): measured by `cpu_matmul_probe` once,
    then read from <cache_dir>/peak-flops/."""
    dtype = dtype or torch.float32
    return _cached_rates(dtype, cache_dir) or remeasure_cpu_matmul_rates(dtype, cache_dir)


def remeasure_cpu_matmul_rates(dtype: torch.dtype | None = None,
                               cache_dir: str | Path | None = None) -> dict[str, float]:
    """The rates of `cpu_matmul_rates` measured now, and returned. Where the cores were quiet
    the cache then keeps, route by route, the higher of these and what it held: on a shared
    machine the rate moves from minute to minute (2048^2 fp32 read 119 and 138 GFLOP/s minutes
    apart on a 2-core EPYC VM), and a probe taken in a slow minute would stand as the peak and
    overstate every later run's MFU (pretrain-small read 1.03 against such a peak)."""
    dtype = dtype or torch.float32
    rates = cpu_matmul_probe_rates(dtype)
    if _cpus_busy():  # other work took cores from the probe: it read low; keep nothing
        return rates
    keep_best_cpu_matmul_rates(rates, dtype, cache_dir)
    return rates


def keep_best_cpu_matmul_rates(rates: dict[str, float], dtype: torch.dtype,
                               cache_dir: str | Path | None = None) -> None:
    """Keep in the cache, route by route, the higher of `rates` and what it held."""
    kept = _cached_rates(dtype, cache_dir) or {}
    best = {route: max(rate, kept.get(route, 0.0)) for route, rate in rates.items()}
    path = _probe_cache_path(dtype, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"peak_flops": max(best.values()), "rates": best,
                               **_probe_key(dtype)}, indent=2))
    tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one


def _cached_rates(dtype: torch.dtype, cache_dir: str | Path | None) -> dict[str, float] | None:
    try:
        path = _probe_cache_path(dtype, cache_dir)
        rates = {k: float(v) for k, v in json.loads(path.read_text())["rates"].items()}
        return rates if rates.get("torch", 0) > 0 else None
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None


def gpu_peak_flops(name: str, dtype: torch.dtype) -> float | None:
    """The data-sheet peak of the GPU called `name` at `dtype`, or None if it is unknown."""
    lowered = name.lower()
    for patterns, peaks in GPU_PEAKS:
        if all(p in lowered for p in patterns):
            key = _DTYPE_NAMES.get(dtype, "fp32")
            if key == "fp32" and torch.backends.cuda.matmul.allow_tf32:
                key = "tf32"
            return peaks.get(key)
    return None


def cpu_matmul_probe(dtype: torch.dtype = torch.float32, size: int = 2048,
                     budget_s: float = 0.8, max_repeats: int = 8) -> float:
    """The CPU's peak matmul FLOP/s now: the best route of `cpu_matmul_probe_rates`."""
    return max(cpu_matmul_probe_rates(dtype, size, budget_s, max_repeats).values())


def cpu_matmul_probe_rates(dtype: torch.dtype = torch.float32, size: int = 2048,
                           budget_s: float = 0.8, max_repeats: int = 8) -> dict[str, float]:
    """Best-of-N FLOP/s of a square `size` matmul on the CPU with the current thread count,
    by route: torch.mm, and for fp32 also the oneDNN projection ptft can send fp32 work to.
    A short (< 2 s per route) stand-in for the peak that a training step's matmuls can reach.
    A oneDNN route that fails here (a build whose op cannot run on this CPU) is left out, so
    training keeps torch's."""
    # A generator of its own: the probe runs after the run is seeded, and only when no peak is
    # cached, so drawing from the global one would make the run's dropout depend on the cache.
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    routes = {"torch": lambda: torch.matmul(a, b, out=out)}
    if dtype == torch.float32 and onednn_linear.available():
        routes["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    rates = {}
    for name, run in routes.items():
        try:
            rates[name] = 2.0 * size ** 3 / _best_time(run, budget_s, max_repeats)
        except RuntimeError:
            if name == "torch":
                raise
    return rates


def _best_time(run, budget_s: float, max_repeats: int) -> float:
    run()  # warm-up: thread pool, kernel selection
    best = float("inf")
    started = time.perf_counter()
    for _ in range(max_repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - started > budget_s:
            break
    return best


def _cpus_busy() -> bool:
    """Whether other processes were running on the cores the probe needed (the load average
    of the last minute, which counts this process too, exceeds the cores left over)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return False
    return load > (os.cpu_count() or 1) - torch.get_num_threads() + 1.5


def _probe_key(dtype: torch.dtype) -> dict:
    return {"cpu": _cpu_model(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "dtype": _DTYPE_NAMES.get(dtype, str(dtype)),
            "format": PROBE_FORMAT}


def _probe_cache_path(dtype: torch.dtype, cache_dir: str | Path | None) -> Path:
    root = Path(cache_dir or os.environ.get("PTFT_CACHE_DIR") or "~/.cache/ptft").expanduser()
    key = hashlib.sha256(json.dumps(_probe_key(dtype), sort_keys=True).encode()).hexdigest()
    return root / "peak-flops" / f"cpu-{key[:16]}.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- utilisation ---------------------------------------------------------------------

def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over peak FLOP/s (a fraction; None without a
    known peak)."""
    if not peak or peak <= 0:
        return None
    return tokens_per_s * flops_per_token / peak


class TrainingMeter:
    """Training compute and time of a run, for tokens/s and MFU: per logged interval and in
    total. Only the steps are timed (from fetching the batches to the optimizer step), so
    evaluations, checkpoints and logging do not dilute the figures."""

    def __init__(self, flops: TrainingFlops, peak: float | None, started: float):
        """`started`: the run's start (a time.perf_counter() value)."""
        self.flops, self.peak, self.started = flops, peak, started
        self.first_step_s: float | None = None
        """Seconds from the run's start (data, model, first evaluation: everything after the
        imports) to the end of its first training step."""
        self.total_s = self.total_flops = 0.0
        self.total_targets = 0
        """Tokens that carried loss in the steps timed so far (all processes together)."""
        self._interval_s = self._interval_flops = 0.0
        self._interval_targets = 0
        self._step_start = 0.0

    def begin_step(self) -> None:
        self._step_start = time.perf_counter()

    def end_step(self, micro_batches, targets: int = 0) -> None:
        """After the optimizer step; `micro_batches` are this process's batches of the step
        (still on the CPU, so counting their tokens does not wait for the device), `targets`
        the step's loss-carrying tokens over all processes."""
        now = time.perf_counter()
        if self.first_step_s is None:
            self.first_step_s = now - self.started
        seconds = now - self._step_start
        flops = sum(self.flops.step(input_tokens(b), b.num_targets, attended_pairs(b))
                    for b in micro_batches)
        self._interval_s += seconds
        self._interval_flops += flops
        self._interval_targets += targets
        self.total_s += seconds
        self.total_flops += flops
        self.total_targets += targets

    def take_interval(self) -> tuple[float, int, float | None]:
        """(seconds, targets, MFU) of the steps since the last call; starts a new interval."""
        seconds, targets, flops = self._interval_s, self._interval_targets, self._interval_flops
        self._interval_s = self._interval_flops = 0.0
        self._interval_targets = 0
        return seconds, targets, mfu(1.0 / seconds, flops, self.peak) if seconds > 0 else None

    @property
    def mfu(self) -> float | None:
        """MFU over every step timed so far."""
        return mfu(1.0 / self.total_s, self.total_flops, self.peak) if self.total_s else None


def attended_pairs(batch) -> int:
    """The sum of n^2 over a batch's sequences, n counting the tokens that attend to each
    other: each packed sample on its own, each padded row without its padding, each block of
    pre-training whole."""
    if batch.segments is not None:
        return sum((end - start) ** 2 for row in batch.segments for start, end in row)
    mask = batch.inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int((mask.sum(dim=1) ** 2).sum())
    rows, length = batch.inputs["input_ids"].shape
    return rows * length ** 2


def input_tokens(batch) -> int:
    """Tokens a batch feeds the model: padding excluded where a (B, T) attention mask marks it
    (packed batches carry a few trailing padding tokens that are counted)."""
    mask = batch.inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return batch.inputs["input_ids"].numel()
