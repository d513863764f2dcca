"""The fused RMSNorm against transformers' own: the same output bit for bit, the same gradients,
in fp32 and under bf16 autocast, in a whole model and alone (ptft/engine/rms_norm.py)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from conftest import assert_same_loss_and_grads, lm_loss_and_grads, tiny_llama
from ptft.engine.rms_norm import rms_norm, use_fused_rms_norms


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_one_norm_matches_llamas(input_dtype):
    norm = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, 48, dtype=input_dtype) * 3
    grad = torch.randn(3, 7, 48)
    results = []
    for forward in (norm, lambda h: rms_norm(h, norm.weight, norm.variance_epsilon)):
        x_ = x.clone().requires_grad_()
        norm.weight.grad = None
        out = forward(x_)
        out.backward(grad.to(out.dtype))
        results.append((out.detach(), x_.grad, norm.weight.grad))
    (want_out, want_x, want_w), (got_out, got_x, got_w) = results
    assert got_out.dtype == want_out.dtype and torch.equal(got_out, want_out)  # same arithmetic
    assert got_x.dtype == input_dtype
    tolerance = 1e-5 if input_dtype == torch.float32 else 2e-2
    assert torch.allclose(got_x.float(), want_x.float(), rtol=tolerance,
                          atol=tolerance * want_x.abs().max().item())
    assert torch.allclose(got_w, want_w, rtol=tolerance, atol=tolerance * want_w.abs().max().item())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_a_model_trains_the_same_with_fused_norms(dtype):
    theirs = tiny_llama()
    ours = copy.deepcopy(theirs)
    assert use_fused_rms_norms(ours) == 2 * 2 + 1 and use_fused_rms_norms(ours) == 0
    assert_same_loss_and_grads(lm_loss_and_grads(theirs, dtype), lm_loss_and_grads(ours, dtype),
                               dtype)
    # the class, names and state dict are Llama's; the model still pickles
    assert type(ours.model.norm) is LlamaRMSNorm
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert pickle.loads(pickle.dumps(ours)).model.norm.forward.module is not None


def test_no_gradient_no_autograd_function():
    norm = LlamaRMSNorm(8)
    use_fused_rms_norms(norm)
    with torch.no_grad():
        assert norm(torch.randn(2, 8)).grad_fn is None
    with pytest.raises(RuntimeError):  # no second order: it must fail rather than be wrong
        x = torch.randn(2, 8, requires_grad=True)
        (g,) = torch.autograd.grad(norm(x).sum(), x, create_graph=True)
        g.sum().backward()
