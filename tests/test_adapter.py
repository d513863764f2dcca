"""Bottleneck adapters on real tiny transformers models (Llama, GPT-2, Llama classifier)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig,
                          LlamaForSequenceClassification)

from ptft.errors import UsageError
from ptft.methods import adapter
from ptft.methods.adapter import AdapterMethodConfig, Bottleneck

H = 32
B = H // 16  # default reduction_factor 16
PER_ADAPTER = 2 * H * B + B + H


def llama(num_layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=H, intermediate_size=64,
                      num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(cfg).eval()


def gpt2(num_layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=H, n_layer=num_layers, n_head=2,
                     bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def llama_classifier(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


BUILDERS = {"llama": llama, "gpt2": gpt2}
INPUT = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model, ids=INPUT):
    with torch.no_grad():
        return model(input_ids=ids).logits


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapters(model):
    return [name for name, m in model.named_modules() if isinstance(m, Bottleneck)]


def train_steps(model, steps=5):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=INPUT, labels=INPUT).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def test_bottleneck_is_identity_residual_at_init():
    b = Bottleneck(H, 4, "gelu")
    x = torch.randn(3, 5, H)
    assert torch.equal(b(x), torch.zeros_like(x))
    assert torch.count_nonzero(b.up.weight) == 0 and torch.count_nonzero(b.up.bias) == 0
    assert torch.count_nonzero(b.down.weight) > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("placement,per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_init_is_exact_and_only_adapters_train(arch, placement, per_layer):
    base = BUILDERS[arch]()
    model = adapter.apply(copy.deepcopy(base), AdapterMethodConfig(placement=placement))
    names = adapters(model)
    assert len(names) == 2 * per_layer
    # GPT-2's attn.c_attn also ends in "attn"; only the outer block gets an adapter.
    assert all(n.endswith(".ptft_adapter") and "c_attn" not in n for n in names)
    if placement == "pfeiffer":
        assert all(".mlp." in n for n in names)
    assert torch.equal(logits(model), logits(base))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".ptft_adapter." in n for n in trainable)
    assert n_trainable(model) == len(names) * PER_ADAPTER
    assert set(adapter.adapter_state(model)) == set(trainable)
    # Real child modules: state_dict and deepcopy see them (the copy uses its own adapters).
    assert any(".ptft_adapter." in k for k in model.state_dict())
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name in adapters(clone):
            clone.get_submodule(name).up.bias.fill_(1.0)
    assert not torch.equal(logits(clone), logits(model))
    assert torch.equal(logits(model), logits(base))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_changes_only_adapters_and_save_load_roundtrip(arch, tmp_path):
    base = BUILDERS[arch]()
    model = adapter.apply(copy.deepcopy(base), AdapterMethodConfig(non_linearity="silu"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_steps(model)
    assert losses[-1] < losses[0]
    trained = logits(model)
    assert not torch.equal(trained, logits(base))
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n

    out = tmp_path / "final"
    adapter.save_final(model, None, out)
    assert adapter.is_adapter_dir(out) and not adapter.is_adapter_dir(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors",
                                                     "ptft_adapter_config.json"]
    info = json.loads((out / "ptft_adapter_config.json").read_text())
    assert info["format"] == 1 and info["non_linearity"] == "silu"
    assert info["placement"] == "houlsby" and "base_model_name_or_path" in info

    fresh = adapter.load(BUILDERS[arch](), out)
    assert not fresh.training
    assert torch.equal(logits(fresh), trained)


def test_norms_and_head_llama(tmp_path):
    model = adapter.apply(llama(), AdapterMethodConfig(placement="pfeiffer",
                                                       train_layer_norms=True, train_head=True))
    norms = 5 * H  # 2 RMSNorm weights per layer + the final norm
    head = 128 * H  # Llama's lm_head is untied by default
    assert n_trainable(model) == 2 * PER_ADAPTER + norms + head
    state = adapter.adapter_state(model)
    assert "lm_head.weight" in state and "model.norm.weight" in state
    assert not model.model.embed_tokens.weight.requires_grad
    train_steps(model, 3)
    adapter.save_final(model, None, tmp_path)
    assert torch.equal(logits(adapter.load(llama(), tmp_path)), logits(model))


def test_tied_head_gpt2_trains_the_embedding(tmp_path):
    model = adapter.apply(gpt2(), AdapterMethodConfig(train_head=True, train_layer_norms=True))
    assert model.lm_head.weight is model.transformer.wte.weight
    norms = 5 * 2 * H  # LayerNorm weight + bias: ln_1, ln_2 per layer + ln_f
    assert n_trainable(model) == 4 * PER_ADAPTER + norms + 128 * H
    assert "transformer.wte.weight" in adapter.adapter_state(model)
    before = model.transformer.wte.weight.detach().clone()
    train_steps(model, 3)
    assert not torch.equal(model.transformer.wte.weight, before)
    adapter.save_final(model, None, tmp_path)
    assert torch.equal(logits(adapter.load(gpt2(), tmp_path)), logits(model))


def test_classifier_head_score():
    base = llama_classifier()
    model = adapter.apply(copy.deepcopy(base), AdapterMethodConfig(train_head=True))
    assert torch.equal(logits(model), logits(base))
    assert model.score.weight.requires_grad
    assert n_trainable(model) == 4 * PER_ADAPTER + 3 * H  # score: Linear(32, 3, bias=False)


@pytest.mark.parametrize("layers", [1, 3])
def test_load_rejects_mismatching_base(layers, tmp_path):
    model = adapter.apply(llama(), AdapterMethodConfig())
    adapter.save_final(model, None, tmp_path)
    with pytest.raises(ValueError, match="does not fit this base model"):
        adapter.load(llama(num_layers=layers), tmp_path)


def test_load_rejects_other_hidden_size(tmp_path):
    model = adapter.apply(llama(), AdapterMethodConfig())
    adapter.save_final(model, None, tmp_path)
    torch.manual_seed(0)
    other = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="shape mismatch"):
        adapter.load(other, tmp_path)


@pytest.mark.parametrize("key,cfg", [
    ("method.attention_modules", AdapterMethodConfig(attention_modules=r"nothing_here$")),
    ("method.ffn_modules", AdapterMethodConfig(placement="pfeiffer", ffn_modules=r"^nope$")),
    ("method.placement", AdapterMethodConfig(placement="middle")),
    ("method.non_linearity", AdapterMethodConfig(non_linearity="tanh")),
    ("method.reduction_factor", AdapterMethodConfig(reduction_factor=0)),
    ("method.ffn_modules", AdapterMethodConfig(ffn_modules="(")),
])
def test_usage_errors_name_the_key(key, cfg):
    with pytest.raises(UsageError) as err:
        adapter.apply(llama(), cfg)
    assert key in str(err.value)


def test_bad_placement_lists_valid_values():
    with pytest.raises(UsageError, match="houlsby, pfeiffer"):
        adapter.apply(gpt2(), AdapterMethodConfig(placement="both"))


def test_bottleneck_width_at_least_one():
    model = adapter.apply(llama(), AdapterMethodConfig(reduction_factor=1000))
    assert model.model.layers[0].mlp.ptft_adapter.down.out_features == 1


@pytest.mark.parametrize("key,value,valid", [("method.placement", "both", "houlsby, pfeiffer"),
                                             ("method.non_linearity", "tanh", "relu, gelu, silu")])
def test_bad_choices_are_refused_when_the_config_is_composed(key, value, valid):
    """Before any data is prepared or model loaded: `ptft config` already refuses them."""
    from ptft.config.compose import compose
    with pytest.raises(UsageError, match=f"{key}.*{valid}"):
        compose("finetune", ["method=adapter", f"{key}={value}"])
