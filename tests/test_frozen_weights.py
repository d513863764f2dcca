"""Frozen projection weights stored in the autocast dtype: the same results bit for bit, the
trained and shared weights untouched."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_llama
from ptft.config.schema import (AdapterMethodConfig, FullMethodConfig, IA3MethodConfig,
                                LoraMethodConfig)
from ptft.engine.frozen_weights import store_frozen_projections_in
from ptft.methods import apply_method

METHODS = {"lora": LoraMethodConfig(), "adapter": AdapterMethodConfig(), "ia3": IA3MethodConfig()}


def _trained(model):
    """Give the zero-initialised halves of the methods (LoRA's B, adapters' up projections)
    values, so that what they add shows in the outputs."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() >= 1:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _loss_and_grads(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("method", list(METHODS))
def test_results_are_bit_for_bit_the_same(method, tied):
    model = _trained(apply_method(tiny_llama(tie_word_embeddings=tied), METHODS[method], "lm"))
    converted = copy.deepcopy(model)
    assert store_frozen_projections_in(converted, torch.bfloat16) > 0
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    want_loss, want_grads = _loss_and_grads(model, ids)
    got_loss, got_grads = _loss_and_grads(converted, ids)
    assert torch.equal(got_loss, want_loss)
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        assert torch.equal(got_grads[name], grad), name


@pytest.mark.parametrize("tied", [False, True])
def test_only_frozen_unshared_projections_change(tied):
    model = apply_method(tiny_llama(tie_word_embeddings=tied), LoraMethodConfig(), "lm")
    store_frozen_projections_in(model, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    frozen_projection = [n for n in dtypes if n.endswith("q_proj.base_layer.weight")]
    assert frozen_projection and all(dtypes[n] == torch.bfloat16 for n in frozen_projection)
    # trained LoRA weights, norms and the embedding stay fp32
    assert all(dtypes[n] == torch.float32 for n in dtypes if "lora_" in n or "norm" in n
               or "embed_tokens" in n)
    head = model.get_base_model().lm_head.weight
    # a tied head is the embedding's table, which autocast leaves in fp32; an untied one is
    # a frozen projection like the others
    assert head.dtype == (torch.float32 if tied else torch.bfloat16)


def test_nothing_changes_in_fp32_in_full_training_or_under_dora():
    model = tiny_llama(tie_word_embeddings=False)
    assert store_frozen_projections_in(model, None) == 0
    full = apply_method(tiny_llama(tie_word_embeddings=False), FullMethodConfig(), "lm")
    assert store_frozen_projections_in(full, torch.bfloat16) == 0
    dora = apply_method(tiny_llama(tie_word_embeddings=False), LoraMethodConfig(use_dora=True),
                        "lm")
    store_frozen_projections_in(dora, torch.bfloat16)
    layer = dora.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.get_base_layer().weight.dtype == torch.float32  # DoRA reads it: kept
