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
    """bf16 autocast where the device runs it natively (CUDA with bf16 support; CPUs with
    AVX512-BF16 or AMX instructions), else fp32."""
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
    "docstrings",     # fine-tuning (SFT): summarise a stdlib function from its code
    "stdlib-topics",  # fine-tuning (classification): which stdlib package a docstring is from
)
# Sources whose records are fine-tuning examples rather than running text.
TASK_SOURCES = ("docstrings", "stdlib-topics")
# Sources read from the user's files (data.paths; data.eval_paths in the same format).
FILE_SOURCES = ("text-files", "jsonl", "parquet", "csv")


class Overlong(str, Enum):
    truncate = "truncate"
    """Keep the first train.seq_len tokens (a response cut short still trains)."""
    drop = "drop"
    """Leave the sample out."""


class Task(str, Enum):
    auto = "auto"
    """classification for data=stdlib-topics, else sft."""
    sft = "sft"
    """Instruction tuning: loss on the response tokens of prompt/response or chat records."""
    classification = "classification"
    """A sequence-classification head on the pre-trained body; accuracy at each evaluation."""


class OnNonFinite(str, Enum):
    stop = "stop"
    """Stop the run before the optimizer step; the last good checkpoint stays."""
    skip = "skip"
    """Skip that step's update (at most train.max_nonfinite_skips times, then stop)."""


class AdapterPlacement(str, Enum):
    houlsby = "houlsby"
    """After the attention and the feed-forward block of every layer (Houlsby et al. 2019)."""
    pfeiffer = "pfeiffer"
    """After the feed-forward block only (Pfeiffer et al. 2020)."""


class NonLinearity(str, Enum):
    relu = "relu"
    gelu = "gelu"
    silu = "silu"


class Strategy(str, Enum):
    ddp = "ddp"
    """Every process holds the whole model; gradients are averaged (DistributedDataParallel)."""
    fsdp = "fsdp"
    """Parameters, gradients and optimizer state sharded over processes (FSDP2 fully_shard,
    per decoder layer); for models too big for one device. With LoRA, adapters, IA3 or prompt
    tuning the frozen base is sharded too."""


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
    """Column holding the text, for the jsonl, parquet, csv and hub sources (and the text to
    classify when fine-tuning a classifier)."""
    prompt_field: str = "prompt"
    """Fine-tuning (SFT): column holding the prompt."""
    response_field: str = "response"
    """Fine-tuning (SFT): column holding the response the model learns to give."""
    messages_field: str = "messages"
    """Fine-tuning (SFT): column holding a chat as a list of {role, content} messages; used
    instead of prompt/response when the records have it."""
    label_field: str = "label"
    """Fine-tuning (classification): column holding the label (a string or an integer)."""
    overlong: Overlong = Overlong.truncate
    """Fine-tuning: what happens to a sample longer than train.seq_len (counted and reported)."""
    packing: bool = True
    """Fine-tuning (SFT): pack several short samples into one sequence of train.seq_len. Each
    sample attends only to itself and its positions restart, so results match unpacked."""
    name: Optional[str] = None
    """Hub dataset name for source=hub, as passed to datasets.load_dataset."""
    subset: Optional[str] = None
    """Hub dataset configuration (subset), for source=hub."""
    split: str = "train"
    """Split read from a hub dataset."""
    revision: Optional[str] = None
    """Hub dataset revision for source=hub: a branch, tag or commit. null: the default branch,
    whose current commit (asked of the hub when it can be reached) keys the token cache, so
    a dataset updated on the hub is read and tokenised again."""
    eval_paths: list[str] = field(default_factory=list)
    """Explicit evaluation files, same format as `paths` (file sources only); when set,
    eval_fraction is not used."""
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


@dataclass
class FinetuneStageConfig:
    name: str = "finetune"
    """Specialise a pre-trained model (model.path) on a task dataset."""
    task: Task = Task.auto
    train_on_prompt: bool = False
    """SFT: also train on the prompt tokens (by default only the response carries loss)."""


# Stage and method options carry keys of their own, so each has its own schema, chosen by its
# `name`. The root schema leaves those blocks open (Any) and compose.py checks them here.
STAGE_SCHEMAS: dict[str, type] = {"pretrain": PretrainStageConfig, "finetune": FinetuneStageConfig}


@dataclass
class FullMethodConfig:
    name: str = "full"
    """Every weight of the model trains."""


@dataclass
class LoraMethodConfig:
    name: str = "lora"
    """Low-rank adapters on linear layers, through peft (Hu et al. 2021)."""
    r: int = 8
    """Rank of the update matrices."""
    alpha: float = 16.0
    """Scale: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the LoRA input. Off by default, as in peft and torchtune's recipes: peft
    applies it separately to every adapted projection, which costs a copy of the input kept
    for backward and a random mask each time (measured on llama-small, fp32: step 1.09x full
    fine-tuning with 0.05, 0.84x with 0; peak RSS 3.9 GB vs 3.2 GB), and a merged weight
    cannot express it, so with dropout LoRA trains without ptft's merged-weight path
    (ptft/methods/lora_merged_weight.py; 0.77x with 0 since). Try 0.05-0.1 against overfitting
    on small datasets."""
    target_modules: Optional[list[str]] = None
    """Module names to adapt. null: every linear layer of the attention and feed-forward
    blocks, by architecture (Llama: q/k/v/o/gate/up/down_proj; GPT-2: c_attn, c_proj, c_fc;
    BERT-like: query, key, value, dense)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA, Liu et al. 2024)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)."""


@dataclass
class AdapterMethodConfig:
    name: str = "adapter"
    """Bottleneck adapters (Houlsby et al. 2019): ptft's own module, see ptft/methods/adapter.py."""
    reduction_factor: int = 16
    """Bottleneck width = hidden_size // reduction_factor (at least 1)."""
    placement: AdapterPlacement = AdapterPlacement.houlsby
    """houlsby: after the attention and the feed-forward block of every layer;
    pfeiffer: after the feed-forward block only (Pfeiffer et al. 2020)."""
    non_linearity: NonLinearity = NonLinearity.relu
    """The bottleneck's activation: relu | gelu | silu."""
    train_layer_norms: bool = False
    """Also train the model's normalisation layers."""
    train_head: bool = False
    """Also train the output head (for a classifier the new head always trains)."""
    attention_modules: str = r"(self_attn|attn|attention)$"
    """Regex on module names marking attention blocks."""
    ffn_modules: str = r"(mlp|feed_forward|ffn)$"
    """Regex on module names marking feed-forward blocks."""


@dataclass
class IA3MethodConfig:
    name: str = "ia3"
    """Learned rescaling of keys, values and feed-forward activations, through peft
    (Liu et al. 2022): the fewest trainable parameters."""
    target_modules: Optional[list[str]] = None
    """null: keys, values and the feed-forward down projection, by architecture."""


@dataclass
class PromptTuningMethodConfig:
    name: str = "prompt_tuning"
    """Learned virtual tokens prepended to every input, through peft (Lester et al. 2021).
    Samples are not packed with this method (the virtual tokens belong to one sample)."""
    num_virtual_tokens: int = 16


METHOD_SCHEMAS: dict[str, type] = {
    "full": FullMethodConfig, "lora": LoraMethodConfig, "adapter": AdapterMethodConfig,
    "ia3": IA3MethodConfig, "prompt_tuning": PromptTuningMethodConfig}


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
    """Evaluate every N steps (and once before the first step and after the last; 0: only
    those two)."""
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
    strategy: Strategy = Strategy.ddp
    """How several processes (torchrun, srun) share the work; one process ignores it."""
    on_nonfinite: OnNonFinite = OnNonFinite.stop
    """What a NaN/inf loss or gradient norm does (see OnNonFinite)."""
    max_nonfinite_skips: int = 10
    """With on_nonfinite=skip, stop after this many skipped steps."""
    compile: bool = False
    """torch.compile the model (in place, so checkpoints keep their names). Off by default: on
    CPUs it measured no faster and costs tens of seconds of compilation at start; try it on
    GPUs for long runs."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them: much
    less memory for about a third more compute (transformers models; works with LoRA and
    adapters)."""
    chunked_loss: Optional[bool] = None
    """Compute the language-modelling loss from the last hidden states a chunk of rows at a
    time, with the gradients in the same pass (a fused linear cross-entropy,
    ptft/engine/fused_loss.py), so the (tokens x vocab) fp32 logits never exist: same numbers,
    less memory, and on CPUs faster (the chunk stays in cache). null: on wherever the model
    allows it (a causal LM with a plain output projection; not FSDP-sharded, not prompt
    tuning), else the plain loss; true: on, or an error saying why it cannot be."""


# The values each number may take (OmegaConf checks types, not ranges): compose.validate
# turns a value outside them into one usage error, before a run starts. (low, high), either
# end None for unbounded; null values of Optional keys are not checked.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "train.max_steps": (1, None), "train.epochs": (1e-9, None), "train.batch_size": (1, None),
    "train.grad_accum": (1, None), "train.seq_len": (2, None), "train.lr": (0, None),
    "train.min_lr_ratio": (0, 1), "train.warmup_steps": (0, None),
    "train.weight_decay": (0, None), "train.beta1": (0, 1), "train.beta2": (0, 1),
    "train.grad_clip": (1e-12, None), "train.eval_every": (0, None),
    "train.eval_batches": (0, None), "train.save_every": (0, None), "train.log_every": (1, None),
    "train.max_nonfinite_skips": (0, None), "run.keep_last": (1, None),
    "data.eval_fraction": (0, 1), "data.max_documents": (1, None),
    "method.r": (1, None), "method.alpha": (0, None), "method.dropout": (0, 1),
    "method.reduction_factor": (1, None), "method.num_virtual_tokens": (1, None),
    "model.vocab_size": (2, None), "model.hidden_size": (1, None), "model.num_layers": (1, None),
    "model.num_heads": (1, None), "model.intermediate_size": (1, None),
}


@dataclass
class RunConfig:
    dir: Optional[str] = None
    """Run directory. null: runs/<stage>/<timestamp>/ (in a sweep, one directory per job)."""
    root: str = "runs"
    """Parent of the automatic run directories."""
    name: Optional[str] = None
    """Name the run: its directory is <root>/<stage>/<name> (a plain name: no '/', no '..').
    Giving the same name again resumes it (see resume). null: a timestamp."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint of run.dir when there is one;
    never: refuse a run.dir that holds checkpoints; a path: resume from that checkpoint."""
    keep_last: Optional[int] = None
    """Keep only the newest K checkpoints (older ones are deleted after a successful save).
    null: keep all."""
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    """Where metrics go: jsonl (metrics.jsonl, always written) and optionally tensorboard
    (event files in <run dir>/tensorboard/; pip install 'ptft[tensorboard]'),
    e.g. run.loggers=[jsonl,tensorboard]. See ptft/engine/metrics.py."""


@dataclass
class RootConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: Any = None
    method: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
