"""Models: built from a config with random init (pre-training) or loaded from a directory.

Both give a plain `transformers` causal LM, so the saved result loads with
`AutoModelForCausalLM.from_pretrained` and no ptft import.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel

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


def load_model(path: str, trust_remote_code: bool = False) -> PreTrainedModel:
    """A causal LM from a Hugging Face model directory or hub name."""
    source = check_model_path(path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        return AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=torch.float32, attn_implementation="sdpa",
            trust_remote_code=trust_remote_code)
    except OSError as err:
        raise UsageError(f"could not load model.path={path}: {first_line(err)} "
                         "Use a local model directory, or check the name and your network "
                         "(the hub needs one).") from None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters), counting tied weights once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
