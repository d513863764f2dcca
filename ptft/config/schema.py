"""The typed schema of a run: every key a user can set, its type, default and meaning.

The YAML files under configs/ choose values; this file says what keys exist. A composed config
is merged into these dataclasses (see compose.py), so a misspelled key or a value of the wrong
type is rejected before any work starts, and no default hides in code as `cfg.get(k, default)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional


class Arch(str, Enum):
    llama = "llama"
    gpt2 = "gpt2"


class Precision(str, Enum):
    auto = "auto"
    """bf16 autocast where the device runs it natively (CUDA with bf16 support), else fp32."""
    fp32 = "fp32"
    bf16 = "bf16"
    """bf16 autocast for matmuls; weights and optimizer state stay fp32."""


# Where documents come from. A plain tuple, not an Enum: OmegaConf matches enums by member
# name, and these names carry hyphens. compose.validate() checks data.source against it.
DATA_SOURCES = (
    "python-docs",  # Python's own documentation (pydoc topics) and the stdlib's docstrings
    "python-code",  # the standard library's source code
    "text-files",   # plain text files, one document per file
    "jsonl",
    "parquet",
    "csv",
    "hub",          # a Hugging Face hub dataset, by data.name (needs a network)
)


class Device(str, Enum):
    auto = "auto"
    """CUDA if present, else CPU."""
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class ModelConfig:
    name: str = "llama-tiny"
    """Label of this model option (shown in logs and summaries)."""
    path: Optional[str] = None
    """A Hugging Face model directory (or hub name) to start from instead of random init.
    Its architecture and tokenizer are used; the shape keys below are then ignored."""
    trust_remote_code: bool = False
    """Run Python code shipped with a model from `path`. Only for sources you trust."""
    arch: Arch = Arch.llama
    """Architecture built from scratch when `path` is not set."""
    vocab_size: int = 8192
    """Vocabulary size; the byte-level BPE tokenizer trained on the corpus gets this size."""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention (Llama only); null means num_heads."""
    intermediate_size: int = 512
    """Width of the feed-forward block."""
    max_position_embeddings: int = 1024
    """Longest sequence the position encoding supports; train.seq_len must not exceed it."""
    rope_theta: float = 10000.0
    """RoPE base frequency (Llama only)."""
    tie_word_embeddings: bool = True
    """Share the input embedding and output projection (saves vocab_size x hidden_size)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of weights."""


@dataclass
class DataConfig:
    source: str = "python-docs"
    """Where documents come from: one of DATA_SOURCES above."""
    paths: list[str] = field(default_factory=list)
    """Local files or glob patterns, for the text-files, jsonl, parquet and csv sources."""
    text_field: str = "text"
    """Column holding the text, for the jsonl, parquet, csv and hub sources."""
    name: Optional[str] = None
    """Hub dataset name for source=hub, as passed to datasets.load_dataset."""
    subset: Optional[str] = None
    """Hub dataset configuration (subset), for source=hub."""
    split: str = "train"
    """Split read from a hub dataset."""
    eval_paths: list[str] = field(default_factory=list)
    """Explicit evaluation files, same format as `paths`; when set, eval_fraction is not used."""
    eval_fraction: float = 0.02
    """Share of documents held out for evaluation, chosen by a hash of each document's id so
    that the split stays put when the corpus grows."""
    max_documents: Optional[int] = None
    """Read only the first N documents (quick experiments, tests). null: all of them."""
    cache_dir: str = "${oc.env:PTFT_CACHE_DIR,'~/.cache/ptft'}"
    """Where trained tokenizers and token arrays are cached, keyed by everything that
    affects them; a second run with the same data skips the preparation."""


@dataclass
class PretrainStageConfig:
    name: str = "pretrain"
    """Next-token prediction on documents packed into blocks of train.seq_len tokens."""


# Stage and method options carry keys of their own, so each has its own schema, chosen by its
# `name`. The root schema leaves those blocks open (Any) and compose.py checks them here.
STAGE_SCHEMAS: dict[str, type] = {"pretrain": PretrainStageConfig}


@dataclass
class FullMethodConfig:
    name: str = "full"
    """Every weight of the model trains."""


METHOD_SCHEMAS: dict[str, type] = {"full": FullMethodConfig}


@dataclass
class TrainConfig:
    max_steps: Optional[int] = 400
    """Optimizer steps to run. null: run `epochs` full passes over the training data."""
    epochs: Optional[float] = None
    """Passes over the training data, used when max_steps is null."""
    batch_size: int = 16
    """Sequences per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Tokens per step = batch_size x grad_accum x seq_len."""
    seq_len: int = 256
    """Tokens per training sequence."""
    lr: float = 1e-3
    """Peak learning rate, reached after warm-up."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr x min_lr_ratio."""
    warmup_steps: int = 40
    """Steps of linear warm-up from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to weight matrices and embeddings (tensors of 2 or
    more dimensions), not to biases or normalisation weights."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: Optional[float] = 1.0
    """Clip the global gradient norm to this value; null disables clipping."""
    eval_every: int = 100
    """Evaluate every N steps (and once before the first step and after the last)."""
    eval_batches: int = 20
    """Batches of the held-out split per evaluation (0: all of it)."""
    save_every: int = 200
    """Write a checkpoint every N steps (0: only the final model)."""
    log_every: int = 10
    """Log training metrics every N steps (and print a plain line on non-terminals)."""
    seed: int = 1234
    """Seeds model init, data order and dropout."""
    precision: Precision = Precision.auto
    device: Device = Device.auto


@dataclass
class RunConfig:
    dir: Optional[str] = None
    """Run directory. null: runs/<stage>/<timestamp>/ (in a sweep, one directory per job)."""
    root: str = "runs"
    """Parent of the automatic run directories."""


@dataclass
class RootConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: Any = None
    method: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
