"""ptft's LoRA layer against peft's own: the same outputs and gradients on the merged-weight
training path and the in-place one, peft's path wherever it is not plain LoRA, and adapters
that plain peft loads."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from conftest import assert_same_loss_and_grads, devices, tiny_llama
from ptft.methods.lora_linear import FastLoraLinear, use_fast_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _pair(**lora):
    """The same base and LoRA weights twice: under peft's layer and under ours."""
    base = tiny_llama()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **lora)
    theirs = get_peft_model(copy.deepcopy(base), config)
    ours_config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **lora)
    use_fast_lora(ours_config)
    ours = get_peft_model(base, ours_config)
    with torch.no_grad():  # B starts at zero: give the update something to add
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _loss_and_grads(model, ids, dtype=None):
    for p in model.parameters():
        p.grad = None
    with torch.autocast(ids.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


IDS = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_same_loss_and_gradients_as_peft(dtype, device, matmul_route, exact_fp32_matmuls):
    theirs, ours = (model.to(device) for model in _pair())
    layer = ours.get_base_model().model.layers[0].mlp.up_proj
    assert type(layer) is FastLoraLinear
    with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        x = torch.randn(3, 32, device=device)
        assert "MergedWeightLora" in type(layer(x).grad_fn).__name__
    ids = IDS.to(device)
    # fp32: the scaled update is rounded once instead of twice; bf16: both round to bf16
    assert_same_loss_and_grads(_loss_and_grads(theirs, ids, dtype),
                               _loss_and_grads(ours, ids, dtype), dtype)


def test_evaluation_and_dropout_take_the_in_place_path():
    theirs, ours = _pair()
    layer = ours.get_base_model().model.layers[0].mlp.up_proj
    with torch.no_grad():
        assert layer(torch.randn(3, 32)).grad_fn is None
        assert torch.allclose(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits,
                              atol=1e-6)
    # dropout applies to the update's input only: no merged weight can express it
    theirs, ours = _pair(lora_dropout=0.5)
    layer = ours.get_base_model().model.layers[0].mlp.up_proj
    assert "MergedWeightLora" not in type(layer(torch.randn(3, 32)).grad_fn).__name__
    torch.manual_seed(2)  # the same dropout masks on both sides
    want_loss, want = _loss_and_grads(theirs, IDS)
    torch.manual_seed(2)
    got_loss, got = _loss_and_grads(ours, IDS)
    assert torch.allclose(got_loss, want_loss, rtol=1e-5)
    for name, grad in want.items():
        assert torch.allclose(got[name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item())


def test_merged_disabled_and_dora_take_peft_forward():
    theirs, ours = _pair()
    with torch.no_grad():
        with ours.disable_adapter(), theirs.disable_adapter():
            assert torch.equal(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits)
        ours.merge_adapter()
        theirs.merge_adapter()
        assert torch.equal(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits)
    theirs, ours = _pair(use_dora=True)
    with torch.no_grad():
        assert torch.equal(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits)


def test_saved_adapter_loads_with_plain_peft(tmp_path):
    _, ours = _pair()
    ours.save_pretrained(tmp_path)
    assert "custom" not in (tmp_path / "adapter_config.json").read_text()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert type(loaded.get_base_model().model.layers[0].mlp.up_proj) is PeftLoraLinear
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=IDS).logits, ours(input_ids=IDS).logits,
                              atol=1e-6)
