"""Several processes, one run: torch.distributed set up from torchrun's or SLURM's environment.

A single process is the world_size=1 case of the same code: every helper here is a no-op
then, so the executor has no second code path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Rank 0 may tokenise a large corpus while the others wait: their wait must not trip the
# default 10-30 minute collective timeout, so it happens in a group with a long one.
PREPARATION_TIMEOUT = timedelta(hours=6)


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    _slow_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def wait_for_main(self) -> None:
        """A barrier with the long preparation timeout (for waiting on rank 0's data work)."""
        if self.distributed:
            dist.barrier(group=self._slow_group)

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of `values` over all ranks (one collective for several numbers)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def on_main(self, make, share: bool = True):
        """Run `make` on rank 0 only and hand its result (share=False: only whether it
        worked) to every rank. A failure stops every rank alike: a UsageError with the same
        message, any other error as a RuntimeError naming rank 0's, instead of leaving the
        others waiting in the next collective."""
        from ptft.errors import UsageError

        result, error, usage, failure = None, None, False, None
        if self.is_main:
            try:
                result = make()
            except UsageError as err:
                error, usage = str(err), True
            except Exception as err:
                if not self.distributed:
                    raise
                error, failure = f"{type(err).__name__}: {err}", err
        if self.distributed:
            # Without share only the outcome travels: the result may be large (prepared data
            # holds the token arrays, which the other ranks read from the cache themselves).
            shared, error, usage = self.broadcast((result if share else None, error, usage))
            result = result if self.is_main else shared
        if error and usage:
            raise UsageError(error)
        if error:
            if failure is not None:
                raise failure
            raise RuntimeError(f"rank 0 failed: {error}")
        return result

    def broadcast(self, obj):
        """Rank 0's value of `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        # The slow group: rank 0 may have been preparing data for a long time.
        dist.broadcast_object_list(box, src=0, group=self._slow_group)
        return box[0]

    def close(self, together: bool = True) -> None:
        """Leave the process group. `together`: every rank is leaving here (the run ended, or
        stopped on a decision all ranks share): wait for each other first, since a rank
        leaving early can abort the others' last collective. False, for a failure of this
        rank alone: the others may be waiting in another collective, and a barrier would hang
        them all until its timeout; this rank exits and the launcher stops the rest."""
        if self.distributed and dist.is_initialized():
            if together:
                dist.barrier()
            dist.destroy_process_group()


def _slurm_to_torchrun_env() -> None:
    """Under `srun` (one task per process) SLURM names the ranks its own way: map them."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    if "SLURM_PROCID" not in os.environ or os.environ.get("SLURM_STEP_ID") is None:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    # Rank 0 runs on the first node of the step (srun places tasks in node order). Not the
    # node srun was launched from: from a login node, that one is outside the allocation.
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    os.environ.setdefault("MASTER_ADDR", first_node(nodes) if nodes else
                          os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def first_node(nodelist: str) -> str:
    """The first host of a SLURM node list, as `scontrol show hostnames | head -n 1` prints it:
    "gpu[07-09,12],cpu1" -> "gpu07", "rack[2-3]-n[1-4]" -> "rack2-n1"."""
    # The first entry: up to the first comma outside brackets.
    entry = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    # Each bracketed range list: its first value, zero padding kept.
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], entry)


def init_world(device: str = "auto") -> World:
    """Join the process group when launched by torchrun or srun; a World of one otherwise.
    `device`: train.device; ranks of a CPU run talk over gloo even where CUDA is present."""
    _slurm_to_torchrun_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        # A task bound to its own GPU (srun --gpus-per-task=1) sees only that one.
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    slow = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
    return World(rank, world_size, local_rank, backend, slow)


def wrap_model(model: torch.nn.Module, world: World, strategy: str, device: torch.device,
               amp_dtype: torch.dtype | None) -> torch.nn.Module:
    """DDP (every rank holds the model, gradients are averaged) or FSDP2 (parameters,
    gradients and optimizer state sharded per decoder layer). One process: unchanged."""
    if not world.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                       else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world.world_size,))
    # On GPUs, compute in bf16 but reduce gradients in fp32 (the usual FSDP2 recipe).
    policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) \
        if amp_dtype is not None and device.type == "cuda" else MixedPrecisionPolicy()
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks FSDP shards one by one: those transformers marks as not to be split
    (`_no_split_modules`: LlamaDecoderLayer, GPT2Block, a vision tower's layers too; what
    accelerate's FSDP auto-wrap takes), outermost only; for other models the longest
    ModuleList (which in a model with more experts or vision layers than decoder layers
    would not be the decoder's)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks, inside = [], set()
    for module in model.modules():  # parents before their children
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    import contextlib

    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not enabled:  # DDP
        return model.no_sync()
    return contextlib.nullcontext()
