"""Methods on real tiny models: what trains, and that nothing changes before the first step."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from ptft.config.schema import (AdapterMethodConfig, FullMethodConfig, IA3MethodConfig,
                                LoraMethodConfig, PromptTuningMethodConfig)
from ptft.methods import apply_method
from ptft.models import count_parameters

CONFIGS = {
    "llama": LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2),
    "gpt2": GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                       eos_token_id=0),
}


def tiny(arch: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[arch], attn_implementation="sdpa").eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", [LoraMethodConfig(), LoraMethodConfig(use_dora=True),
                                    LoraMethodConfig(use_rslora=True), AdapterMethodConfig(),
                                    AdapterMethodConfig(placement="pfeiffer"), IA3MethodConfig()],
                         ids=["lora", "dora", "rslora", "adapter", "adapter-pfeiffer", "ia3"])
def test_model_is_unchanged_before_the_first_step(arch, method):
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        expected = tiny(arch)(ids).logits
        adapted = apply_method(tiny(arch), method, "lm").eval()
        torch.testing.assert_close(adapted(ids).logits, expected, rtol=0, atol=1e-6)
    total, trainable = count_parameters(adapted)
    assert 0 < trainable < total


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_default_lora_targets_every_linear_of_attention_and_mlp(arch):
    model = apply_method(tiny(arch), LoraMethodConfig(), "lm")
    adapted = {name.split(".")[-1] for name, module in model.named_modules()
               if hasattr(module, "lora_A")}
    expected = {"llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj"}, "gpt2": {"c_attn", "c_proj", "c_fc"}}[arch]
    assert adapted == expected


def test_full_trains_everything_and_prompt_tuning_only_its_tokens():
    model = apply_method(tiny("llama"), FullMethodConfig(), "lm")
    total, trainable = count_parameters(model)
    assert trainable == total
    model = apply_method(tiny("llama"), PromptTuningMethodConfig(num_virtual_tokens=4), "lm")
    _, trainable = count_parameters(model)
    assert trainable == 4 * 32  # four virtual token embeddings of hidden size 32


def test_lora_with_targets_the_model_lacks_is_a_usage_error():
    from ptft.errors import UsageError
    with pytest.raises(UsageError, match="method.target_modules"):
        apply_method(tiny("llama"), LoraMethodConfig(target_modules=["nope_proj"]), "lm")


@pytest.mark.parametrize("method", [LoraMethodConfig, IA3MethodConfig])
def test_a_misspelled_target_next_to_a_good_one_is_a_usage_error(method):
    """peft adapts q_proj alone and says nothing: the typo would go unnoticed."""
    from ptft.errors import UsageError
    with pytest.raises(UsageError, match="v_projj matched no layer.*Did you mean 'v_proj'"):
        apply_method(tiny("llama"), method(target_modules=["q_proj", "v_projj"]), "lm")
    model = apply_method(tiny("llama"), method(target_modules=["q_proj", "v_proj"]), "lm")
    assert count_parameters(model)[1] > 0


def test_prompt_tuning_refuses_classification():
    from ptft.errors import UsageError
    with pytest.raises(UsageError, match="would read padding"):
        apply_method(tiny("llama"), PromptTuningMethodConfig(), "classification")


def test_a_model_without_sdpa_attention_loads_with_its_own(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from ptft.data.tokenizer import train_bpe
    from ptft.models import load_model
    tokenizer = train_bpe(["some text for a tokenizer"] * 20, 300)
    Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   intermediate_size=64)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert type(model).__name__ == "Gemma2ForCausalLM"
