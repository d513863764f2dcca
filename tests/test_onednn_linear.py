"""fp32 projections through oneDNN: the same outputs and gradients as F.linear, what takes the
route and what does not, the probe that decides it, and a run that takes it."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, rows, run_ptft, tiny_llama
from ptft.engine import flops as flops_module
from ptft.engine import onednn_linear
from ptft.engine.flops import cpu_matmul_rates
from ptft.engine.onednn_linear import onednn_outruns_torch, route_model

needs_onednn = pytest.mark.skipif(not onednn_linear.available(),
                                  reason="this torch has no oneDNN linear op")


@pytest.fixture
def routed():
    before = onednn_linear.routed()
    onednn_linear.route_fp32_linears(True)
    yield
    onednn_linear.route_fp32_linears(before)


def _made_by(t: torch.Tensor) -> str:
    """The autograd node that made `t`, looking through the reshape of a >2-D input."""
    node = t.grad_fn
    if type(node).__name__ == "ViewBackward0":
        node = node.next_functions[0][0]
    return type(node).__name__


def _grads(fn, tensors):
    for t in tensors:
        t.grad = None
    out = fn()
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    return [out.detach()] + [t.grad for t in tensors]


@needs_onednn
@pytest.mark.parametrize("out_features,in_features", [(48, 16), (16, 48), (24, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_same_output_and_gradients_as_f_linear(out_features, in_features, bias, routed):
    # Both orientations of the weight gradient (wider than tall is computed transposed).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, in_features, generator=g).requires_grad_()
    w = torch.randn(out_features, in_features, generator=g).requires_grad_()
    b = torch.randn(out_features, generator=g).requires_grad_() if bias else None
    tensors = [t for t in (x, w, b) if t is not None]
    got = _grads(lambda: onednn_linear.linear(x, w, b), tensors)
    want = _grads(lambda: F.linear(x, w, b), tensors)
    for a, c in zip(got, want):
        assert a.shape == c.shape and a.is_contiguous()
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-5 * c.abs().max().item())
    out = onednn_linear.linear(x, w, b)
    assert "OneDnnLinear" in _made_by(out)
    frozen = w.detach()  # no weight gradient wanted: only the input's
    x.grad = None
    onednn_linear.linear(x, frozen).sum().backward()
    assert torch.allclose(x.grad, frozen.sum(0).expand_as(x), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(onednn_linear.linear(x, w, b), want[0], atol=1e-5)


@needs_onednn
def test_what_stays_with_torch(routed):
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    assert onednn_linear.applies(x, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast picks its own kernels
        out = onednn_linear.linear(x, w)
        assert out.dtype == torch.bfloat16 and "OneDnn" not in type(out.grad_fn).__name__
    assert not onednn_linear.applies(x.double(), w.double())
    assert not onednn_linear.applies(torch.empty(0, 8), w)  # nothing to multiply
    onednn_linear.route_fp32_linears(False)
    assert "OneDnn" not in type(onednn_linear.linear(x, w).grad_fn).__name__


@needs_onednn
def test_a_model_trains_the_same_through_its_onednn_linears(routed, tmp_path):
    want_model, model = tiny_llama(), tiny_llama()
    names = list(model.state_dict())
    changed = onednn_linear.use_onednn_linears(model)
    # Every projection: 7 per layer and the output head.
    assert changed == 7 * 2 + 1 and onednn_linear.use_onednn_linears(model) == 0
    assert list(model.state_dict()) == names and type(model.lm_head) is torch.nn.Linear
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    for m in (want_model, model):
        m(input_ids=ids, labels=ids).loss.backward()
    up = model.model.layers[0].mlp.up_proj(torch.randn(2, 32, requires_grad=True))
    assert "OneDnn" in type(up.grad_fn).__name__
    for (name, a), b in zip(want_model.named_parameters(), model.parameters()):
        assert torch.allclose(b.grad, a.grad, rtol=1e-4, atol=1e-6), name
    twin = copy.deepcopy(model)  # the patched forward follows the copy, not the original
    assert twin.lm_head.forward.module is twin.lm_head
    path = tmp_path / "model.pt"  # and the whole module pickles with it
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert loaded.lm_head.forward.module is loaded.lm_head
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@needs_onednn
def test_outputs_can_be_changed_in_place_and_frozen_inputs_are_not_kept(routed):
    # peft's LoRA layer adds its update into the base layer's output in place (with dropout)
    x = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    out = onednn_linear.linear(x, w)
    out.add_(1.0).sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand_as(x), atol=1e-5)
    frozen = onednn_linear.linear(x[0], w.detach())  # a frozen base: its input is not needed
    assert "OneDnnLinear" in _made_by(frozen) and frozen.grad_fn.saved_tensors[0] is None
    with pytest.raises(RuntimeError, match="(?i)twice|once_differentiable|double"):
        grad_x, = torch.autograd.grad(onednn_linear.linear(x, w).pow(2).sum(), x,
                                      create_graph=True)
        grad_x.sum().backward()  # no silent second-order gradient: oneDNN's op has none


@needs_onednn
def test_lora_with_dropout_trains_through_the_route(routed):
    from peft import LoraConfig, get_peft_model

    from ptft.methods.lora_linear import use_fast_lora

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                        target_modules=["q_proj", "v_proj", "up_proj"])
    use_fast_lora(config)
    model = get_peft_model(tiny_llama(), config)
    assert onednn_linear.use_onednn_linears(model) > 0  # the frozen base layers
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    model(input_ids=ids, labels=ids).loss.backward()  # the update is added in place
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@needs_onednn
def test_gpt2_conv1d_layers_take_the_route_too(routed):
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2,
                                          n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0))
    want_model, model = gpt2(), gpt2()
    # Per block: c_attn, attention c_proj, c_fc, MLP c_proj (Conv1D); and lm_head (nn.Linear).
    assert onednn_linear.use_onednn_linears(model) == 4 * 2 + 1
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    want_loss = want_model(input_ids=ids, labels=ids).loss
    loss = model(input_ids=ids, labels=ids).loss
    want_loss.backward()
    loss.backward()
    assert torch.allclose(loss, want_loss, rtol=1e-5)
    c_fc = model.transformer.h[0].mlp.c_fc
    assert "OneDnn" in type(c_fc(torch.randn(3, 32, requires_grad=True)).grad_fn).__name__
    for (name, a), b in zip(want_model.named_parameters(), model.parameters()):
        assert torch.allclose(b.grad, a.grad, rtol=1e-4, atol=1e-6), name


def _write_rates(cache_dir, rates: dict) -> None:
    path = flops_module._probe_cache_path(torch.float32, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"peak_flops": max(rates.values()), "rates": rates}))


@needs_onednn
def test_the_route_follows_the_measured_rates(tmp_path, monkeypatch):
    monkeypatch.delenv(flops_module.PEAK_ENV, raising=False)
    cpu = torch.device("cpu")
    before = onednn_linear.routed()
    try:
        _write_rates(tmp_path, {"torch": 2e11, "onednn": 4.6e11})  # AMD Zen 5: MKL runs AVX2
        rates = cpu_matmul_rates(torch.float32, tmp_path)  # read from the cache, not measured
        assert rates == {"torch": 2e11, "onednn": 4.6e11} and onednn_outruns_torch(rates)
        assert flops_module.device_peak_flops(cpu, None, tmp_path) == 4.6e11
        model = tiny_llama()
        assert route_model(model, rates, compiled=False)
        assert onednn_linear.routed() and "forward" in vars(model.lm_head)
        # runs under autocast (no fp32 rates) and compiled models keep torch's matmuls
        assert not route_model(tiny_llama(), None, compiled=False)
        assert not route_model(tiny_llama(), rates, compiled=True)
        level = {"torch": 2e11, "onednn": 2.1e11}  # Intel: MKL runs AVX-512 itself
        model = tiny_llama()
        assert not route_model(model, level, compiled=False)
        assert not onednn_linear.routed() and "forward" not in vars(model.lm_head)
        (tmp_path / "peak-flops").rename(tmp_path / "broken")  # a cache without rates
        _write_rates(tmp_path, {"torch": 2e11})
        path = flops_module._probe_cache_path(torch.float32, tmp_path)
        path.write_text(json.dumps({"peak_flops": 1.0, "rates": {}}))
        monkeypatch.setattr(flops_module, "_cpus_busy", lambda: True)  # measure, keep nothing
        assert cpu_matmul_rates(torch.float32, tmp_path)["torch"] > 1e8  # measured again
    finally:
        onednn_linear.route_fp32_linears(before)


def test_the_probe_measures_each_route_and_caches_them(tmp_path, monkeypatch):
    monkeypatch.setattr(flops_module, "_cpus_busy", lambda: False)
    rates = cpu_matmul_rates(torch.float32, tmp_path)
    assert rates["torch"] > 1e8
    assert ("onednn" in rates) == onednn_linear.available()
    (cached,) = (tmp_path / "peak-flops").glob("cpu-*.json")
    record = json.loads(cached.read_text())
    assert record["rates"] == rates and record["peak_flops"] == max(rates.values())
    # bf16: torch's own (a small probe: on a CPU that emulates bf16 the 2048^2 one takes minutes)
    assert "onednn" not in flops_module.cpu_matmul_probe_rates(torch.bfloat16, size=64,
                                                               budget_s=0.01)


def test_a_resumed_run_takes_its_checkpoints_route_whatever_the_rates(tmp_path):
    from ptft.engine.resume import checkpoint_onednn_route

    (tmp_path / "state.json").write_text(json.dumps({"step": 4, "onednn_linears": False}))
    assert checkpoint_onednn_route(tmp_path) is False
    (tmp_path / "state.json").write_text(json.dumps({"step": 4}))  # saved before it was recorded
    assert checkpoint_onednn_route(tmp_path) is None and checkpoint_onednn_route(None) is None
    before = onednn_linear.routed()
    try:
        favour_onednn, favour_mkl = {"torch": 1.0, "onednn": 3.0}, {"torch": 3.0, "onednn": 1.0}
        assert route_model(tiny_llama(), favour_onednn, False) == onednn_linear.available()
        assert not route_model(tiny_llama(), favour_onednn, False, resumed=False)
        assert route_model(tiny_llama(), favour_mkl, False, resumed=True) == \
            onednn_linear.available()
        assert not route_model(tiny_llama(), None, False, resumed=True)  # not an fp32 CPU run
    finally:
        onednn_linear.route_fp32_linears(before)


def test_an_fp32_run_reports_the_route_it_took(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    result = run_ptft("pretrain", *TINY, "train.precision=fp32", "train.max_steps=6",
                      f"run.dir={run_dir}", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    # The same decision the probe's cached rates give (the run measured or read them).
    assert summary["onednn_linears"] == onednn_outruns_torch(
        cpu_matmul_rates(torch.float32, cache_dir))
    assert summary["precision"] == "fp32"
    assert summary["fused_rms_norms"] == 2 * 2 + 1  # ptft/engine/rms_norm.py, every norm
    assert summary["fused_rotary"] is True  # ptft/engine/rotary.py
    losses = [loss for (kind, _), loss in rows(run_dir).items() if kind == "train"]
    assert losses and all(math.isfinite(loss) for loss in losses)
