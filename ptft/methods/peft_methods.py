"""LoRA, IA3 and prompt tuning through peft. `final/` is a PEFT adapter directory that
`peft.PeftModel.from_pretrained(base, final)` loads without ptft."""

from __future__ import annotations

from pathlib import Path

import torch

from ptft.errors import UsageError

# Every linear layer of the attention and feed-forward blocks: adapting all of them is the
# usual recommendation (QLoRA paper, section 4) over peft's q/v-only default.
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
}


def _task_type(task: str):
    from peft import TaskType
    return TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM


def _peft_config(model: torch.nn.Module, cfg, task: str):
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    model_type = getattr(model.config, "model_type", "")
    # GPT-2 stores its linear layers transposed (Conv1D); peft must be told.
    fan_in_fan_out = model_type == "gpt2"
    if cfg.name == "lora":
        from ptft.methods.lora_linear import use_fast_lora

        targets = cfg.target_modules or LORA_TARGETS.get(model_type, "all-linear")
        config = LoraConfig(task_type=_task_type(task), r=cfg.r, lora_alpha=cfg.alpha,
                            lora_dropout=cfg.dropout, target_modules=targets,
                            use_dora=cfg.use_dora, use_rslora=cfg.use_rslora,
                            fan_in_fan_out=fan_in_fan_out)
        use_fast_lora(config)
        return config
    if cfg.name == "ia3":
        return IA3Config(task_type=_task_type(task), target_modules=cfg.target_modules,
                         feedforward_modules=[] if cfg.target_modules else None,
                         fan_in_fan_out=fan_in_fan_out)
    return PromptTuningConfig(task_type=_task_type(task), num_virtual_tokens=cfg.num_virtual_tokens)


def apply(model: torch.nn.Module, cfg, task: str) -> torch.nn.Module:
    from peft import get_peft_model

    if cfg.name == "prompt_tuning" and task == "classification":
        # peft feeds prompt tuning's base model embeddings, not token ids, and a transformers
        # classifier given no ids pools the last position: padding, for every row shorter
        # than its batch. The same text would then score differently by its batch mates.
        raise UsageError("method=prompt_tuning trains language models here, not classifiers "
                         "(the classification head would read padding); use method=lora, "
                         "ia3 or adapter for data=stdlib-topics and other classification.")
    layers = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
    try:
        adapted = get_peft_model(model, _peft_config(model, cfg, task))
    except ValueError as err:  # e.g. target modules that the model does not have
        raise UsageError(f"method={cfg.name}: {str(err).splitlines()[0]} Check "
                         "method.target_modules against the model's module names.") from None
    _check_every_target_matched(adapted, getattr(cfg, "target_modules", None), layers)
    return adapted


def _check_every_target_matched(model, targets: list[str] | None, layers: list[str]) -> None:
    """peft fails only when no target matches: with method.target_modules=[q_proj, v_projj]
    it would adapt q_proj alone and say nothing of the typo."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not targets:
        return
    adapted = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    missed = [t for t in targets if not any(n == t or n.endswith("." + t) for n in adapted)]
    if missed:
        from ptft.errors import did_you_mean
        hints = "".join(did_you_mean(t, layers) for t in missed)
        raise UsageError(f"method.target_modules: {', '.join(missed)} matched no layer of the "
                         f"model.{hints} Its linear layers: {', '.join(layers)}.")


def save_final(model, tokenizer, path: Path, state_dict: dict | None = None) -> None:
    # peft picks its adapter's weights out of `state_dict` (keys as in model.state_dict()).
    model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
