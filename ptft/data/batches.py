"""What the training loop consumes: batches, drawn from any dataset in a resumable order.

A dataset here is anything with `__len__` (number of training sequences) and
`collate(indices) -> Batch`: pre-training blocks, packed SFT sequences, classification
examples. The loop never needs to know which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100  # a label with this value carries no loss (padding, masked prompt tokens)


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    """Keyword arguments for the model's forward (input_ids, attention_mask, position_ids)."""
    labels: torch.Tensor
    """Next-token targets (B, L) for language modelling, class indices (B,) for classification."""
    num_targets: int
    """Labels that carry loss; the step's loss is normalised by their total over micro-batches."""
    segments: tuple | None = None
    """Packed SFT: per row, the (start, end) of each sample, for attention that runs sample by
    sample (ptft/engine/packed_attention.py); None elsewhere."""

    def to(self, device: torch.device) -> "Batch":
        return Batch({k: v.to(device, non_blocking=True) for k, v in self.inputs.items()},
                     self.labels.to(device, non_blocking=True), self.num_targets, self.segments)


class Dataset(Protocol):
    def __len__(self) -> int: ...
    def collate(self, indices: Sequence[int]) -> Batch: ...


class BlockSampler:
    """Yields batches of indices in a shuffled order that is fixed by (seed, epoch).

    Its whole state is (epoch, position), so a resumed run reads the exact next batch.
    """

    def __init__(self, num_blocks: int, batch_size: int, seed: int):
        self.num_blocks, self.batch_size, self.seed = num_blocks, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)

    def next_batch(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            if self.position == self.num_blocks:  # a batch may straddle two epochs
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(batch), self.num_blocks - self.position)
            batch += self._order[self.position:self.position + take].tolist()
            self.position += take
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


class TrainStream:
    """Endless shuffled training batches of one dataset. With several ranks, every rank
    draws the same global batch (batch_size x world_size indices) and collates its own slice,
    so the run sees the same sequences per step as one process with the global batch."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.dataset, self.batch_size, self.rank = dataset, batch_size, rank
        self.sampler = BlockSampler(len(dataset), batch_size * world_size, seed)

    def next_batch(self) -> Batch:
        indices = self.sampler.next_batch()
        return self.dataset.collate(indices[self.rank * self.batch_size:
                                            (self.rank + 1) * self.batch_size])


def eval_batches(dataset: Dataset, batch_size: int, max_batches: int) -> Iterator[Batch]:
    """`max_batches` batches (0: all) of a dataset, the same every time. A subset is spread
    evenly over the whole dataset rather than taken from its start: packed SFT rows are
    ordered longest sample first and pre-training blocks by document, so the first rows alone
    would measure the longest samples, or the first documents, only."""
    count = len(dataset) if max_batches == 0 else min(len(dataset), max_batches * batch_size)
    rows = [i * len(dataset) // count for i in range(count)] if count else []
    for start in range(0, count, batch_size):
        yield dataset.collate(rows[start:start + batch_size])
