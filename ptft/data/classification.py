"""Classification data: a text and a label per record, padded per batch.

The label names are fixed by the training split (sorted, or the embedded dataset's own
list) and saved with the model as id2label, so predictions read as names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ptft.config.schema import DataConfig
from ptft.data.batches import Batch
from ptft.errors import UsageError


def label_names(records: list[dict], cfg: DataConfig, known: Sequence[str] | None) -> list[str]:
    if known:
        return list(known)
    values = {str(_field(r, cfg.label_field)) for r in records}
    return sorted(values, key=lambda v: (len(v), v) if v.lstrip("-").isdigit() else (1 << 30, v))


def tokenize_examples(records: list[dict], tokenizer, cfg: DataConfig, labels: list[str],
                      seq_len: int) -> tuple[list[np.ndarray], np.ndarray, dict]:
    """(token ids per example, label ids, counts). Texts longer than seq_len are truncated;
    examples whose label the training split never had are left out (counted)."""
    index = {name: i for i, name in enumerate(labels)}
    kept = [r for r in records if str(_field(r, cfg.label_field)) in index]
    texts = [str(_field(r, cfg.text_field)) for r in kept]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    truncated = sum(len(x) > seq_len for x in ids)
    tokens = [np.asarray(x[:seq_len], dtype=np.int64) for x in ids]
    label_ids = np.asarray([index[str(r[cfg.label_field])] for r in kept], dtype=np.int64)
    return tokens, label_ids, {"examples": len(kept), "truncated": truncated,
                               "unknown_label": len(records) - len(kept)}


def _field(record: dict, name: str):
    if record.get(name) is None:
        columns = ", ".join(k for k in record if k != "_origin")
        raise UsageError(f"{record.get('_origin', 'a record')} has no '{name}' (columns: "
                         f"{columns}); set data.text_field / data.label_field.")
    return record[name]


def save_examples(path: Path, tokens: list[np.ndarray], label_ids: np.ndarray, dtype) -> None:
    lengths = np.asarray([len(t) for t in tokens], dtype=np.int64)
    np.save(path / "tokens.npy", np.concatenate(tokens).astype(dtype) if tokens else np.zeros(0, dtype))
    np.save(path / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    np.save(path / "labels.npy", label_ids)


class ClassificationExamples:
    def __init__(self, path: Path, pad_id: int):
        self.tokens = np.load(path / "tokens.npy", mmap_mode="r")
        self.offsets = np.load(path / "offsets.npy")
        self.labels = np.load(path / "labels.npy")
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.labels)

    def samples(self) -> int:
        return len(self.labels)

    def collate(self, indices: Sequence[int]) -> Batch:
        rows = [self.tokens[self.offsets[i]:self.offsets[i + 1]] for i in indices]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):  # right padding: the head reads the last real token
            input_ids[b, :len(row)] = torch.from_numpy(row.astype(np.int64))
            attention[b, :len(row)] = 1
        labels = torch.from_numpy(self.labels[list(indices)])
        return Batch({"input_ids": input_ids, "attention_mask": attention}, labels, len(rows))
