"""Token arrays on disk and the blocks a training step reads from them.

Documents are tokenised once, each followed by EOS, and concatenated into one flat array
(nanoGPT style). Block i is tokens[i*L : i*L+L] with targets shifted by one, so every token
of a block is a prediction target. The array is memory-mapped: a bigger corpus costs disk,
not RAM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ptft.data.batches import Batch

TOKENIZE_BATCH = 256


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest array type for ids below `vocab_size` (see id_bound)."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def id_bound(tokenizer) -> int:
    """One more than the largest id the tokenizer can produce. Not len(tokenizer) alone: a
    vocabulary with gaps in its ids has ids above its size, which a type chosen by the size
    would silently wrap."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def write_tokens(texts: Iterable[str], tokenizer, path: Path, dtype: np.dtype) -> int:
    """Tokenise `texts` in batches (fast tokenizers run them in parallel), append EOS to each,
    and write the flat array to `path`. Returns the number of tokens."""
    eos = tokenizer.eos_token_id
    texts = list(texts)
    count = 0
    with open(path, "wb") as out:
        for start in range(0, len(texts), TOKENIZE_BATCH):
            batch = tokenizer(texts[start:start + TOKENIZE_BATCH], add_special_tokens=False,
                              return_attention_mask=False)["input_ids"]
            flat = np.fromiter((t for ids in batch for t in (*ids, eos)), dtype=dtype)
            flat.tofile(out)
            count += len(flat)
    return count


class TokenBlocks:
    """Fixed-length (input, target) blocks over a memory-mapped token file."""

    def __init__(self, path: Path, dtype: np.dtype, seq_len: int):
        self.tokens = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else \
            np.zeros(0, dtype=dtype)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def collate(self, indices: Iterable[int]) -> Batch:
        """Input ids and next-token targets, both int64 of shape (len(indices), seq_len)."""
        L = self.seq_len
        rows = np.stack([self.tokens[i * L:i * L + L + 1] for i in indices]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return Batch({"input_ids": rows[:, :-1]}, rows[:, 1:], rows[:, 1:].numel())
