"""Models: built from a config with random init (pre-training) or loaded from a directory.

Both give a plain `transformers` causal LM, so the saved result loads with
`AutoModelForCausalLM.from_pretrained` and no ptft import.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          GPT2Config, LlamaConfig, PreTrainedModel)

from ptft.config.schema import Arch, ModelConfig
from ptft.errors import UsageError, first_line


def build_model(cfg: ModelConfig, bos_token_id: int, eos_token_id: int, pad_token_id: int,
                seed: int) -> PreTrainedModel:
    """A randomly initialised causal LM of the shape in `cfg` (seeded: same seed, same weights)."""
    special = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if cfg.arch == Arch.llama:
        config = LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
            max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
            tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.init_std,
            **special)
    else:
        if cfg.num_kv_heads not in (None, cfg.num_heads):
            raise UsageError("model.num_kv_heads (grouped-query attention) is a Llama feature; "
                             "GPT-2 uses one key/value head per query head: set it to null.")
        config = GPT2Config(
            vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size, n_inner=cfg.intermediate_size,
            n_layer=cfg.num_layers, n_head=cfg.num_heads, n_positions=cfg.max_position_embeddings,
            tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.init_std,
            **special)
    if cfg.hidden_size % cfg.num_heads:
        raise UsageError(f"model.hidden_size={cfg.hidden_size} must be divisible by "
                         f"model.num_heads={cfg.num_heads}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # SDPA picks fused attention kernels (FlashAttention on GPUs that have them).
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def check_model_path(path: str) -> str:
    """The local directory or hub name to load from; checked before any work starts.
    A name that is not a local folder goes to the hub, probed first so that offline it fails
    at once rather than after minutes of retries."""
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UsageError(f"model.path={path} is not a Hugging Face model directory (no "
                             "config.json in it). Point it at a directory saved with "
                             "save_pretrained, such as a run's final/ folder.")
        return str(local)
    from ptft.hub import prepare_for_hub
    prepare_for_hub()
    return path


def resolve_latest(path: str, runs_root: str) -> str:
    """model.path=latest: the final model of the newest finished `ptft pretrain` run."""
    if path != "latest":
        return path
    root = Path(runs_root).expanduser() / "pretrain"
    finished = [s.parent for s in root.glob("**/summary.json")
                if (s.parent / "final" / "config.json").is_file()
                and json.loads(s.read_text()).get("status") == "finished"]
    if not finished:
        raise UsageError(f"model.path=latest: no finished pre-training run under {root}. Run "
                         "`ptft pretrain` first, or set model.path=DIR to a Hugging Face model "
                         "directory.")
    newest = max(finished, key=lambda run: (run / "summary.json").stat().st_mtime)
    return str((newest / "final").resolve())


def load_model(path: str, trust_remote_code: bool = False, task: str = "lm",
               labels: list[str] | None = None,
               pad_token_id: int | None = None) -> PreTrainedModel:
    """A causal LM, or for task="classification" a sequence classifier with a new head for
    `labels`, from a Hugging Face model directory or hub name. `pad_token_id`: the id that
    classification batches are padded with; None: the pad id of the tokenizer at `path`
    (ptft.data.tokenizer.load_tokenizer's, which is what prepare_data pads with)."""
    source = check_model_path(path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        common = dict(dtype=torch.float32, attn_implementation="sdpa",
                      trust_remote_code=trust_remote_code)
        if task == "classification":
            config.num_labels = len(labels)
            config.id2label = dict(enumerate(labels))
            config.label2id = {name: i for i, name in enumerate(labels)}
            # The head reads the last token that is not config.pad_token_id, so that id must be
            # the one the batches are padded with. config.json's own (or its EOS) can differ
            # from the tokenizer's: then a shorter row in a batch is read at a padding position.
            if pad_token_id is None:
                pad_token_id = _tokenizer_pad_id(source, trust_remote_code)
            config.pad_token_id = pad_token_id
            return _with_sdpa_if_supported(AutoModelForSequenceClassification, source,
                                           config=config, **common)
        return _with_sdpa_if_supported(AutoModelForCausalLM, source, config=config, **common)
    except OSError as err:
        raise UsageError(f"could not load model.path={path}: {first_line(err)} "
                         "Use a local model directory, or check the name and your network "
                         "(the hub needs one).") from None


def _with_sdpa_if_supported(auto_class, source: str, **kwargs) -> PreTrainedModel:
    """SDPA attention (PyTorch's fused kernels) where the architecture has it, else its own
    default: some (Gemma 2's soft-capped attention, older remote code) refuse SDPA."""
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except ValueError as err:
        if "attention implementation" not in str(err) and "sdpa" not in str(err).lower():
            raise
        kwargs.pop("attn_implementation")
        return auto_class.from_pretrained(source, **kwargs)


def _tokenizer_pad_id(source: str, trust_remote_code: bool) -> int:
    from ptft.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(source, trust_remote_code).pad_token_id
    except (OSError, ValueError) as err:
        raise UsageError(f"could not load the tokenizer of {source}: {first_line(err)}") from None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters), counting tied weights once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
