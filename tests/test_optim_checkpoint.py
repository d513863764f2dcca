"""Tests for the learning-rate schedule, the optimizer's parameter groups and checkpoints."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ptft.config.schema import TrainConfig
from ptft.engine.checkpoint import (
    COMPLETE_MARKER,
    checkpoint_name,
    complete_checkpoints,
    read_tensors,
    save_checkpoint,
    trainable_state,
)
from ptft.engine.checkpoint import load_checkpoint, restore_rng
from ptft.engine.optim import build_optimizer, lr_at, planned_steps
from ptft.errors import UsageError

CONFIG = "train:\n  lr: 0.1\n"  # the config text a checkpoint carries


class Tiny(torch.nn.Module):
    """Embedding, a norm, a biased linear layer and an output head tied to the embedding."""

    def __init__(self, tied: bool = True):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.proj = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.proj(self.norm(self.embed(ids))))


# ---------------------------------------------------------------------------------- lr_at


@pytest.mark.parametrize("warmup,total", [(10, 100), (1, 20), (40, 400), (5, 6)])
def test_lr_schedule_shape(warmup, total):
    cfg = TrainConfig(lr=2e-3, warmup_steps=warmup, min_lr_ratio=0.1)
    lrs = [lr_at(step, cfg, total) for step in range(total)]  # the steps a run executes
    # Linear warm-up from lr/warmup to lr.
    assert lrs[0] == pytest.approx(cfg.lr / warmup)
    for step in range(warmup):
        assert lrs[step] == pytest.approx(cfg.lr * (step + 1) / warmup)
    # Peak at the last warm-up step, and only there; never above it.
    assert lrs[warmup - 1] == pytest.approx(cfg.lr)
    assert lrs[warmup] < cfg.lr
    assert max(lrs) == pytest.approx(cfg.lr)
    # Monotone decay afterwards, down to lr * min_lr_ratio at the run's last step.
    decay = lrs[warmup:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert lrs[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    # Cosine: half way through the decay, half way between peak and floor.
    if (total - warmup) % 2 == 0:
        mid = warmup + (total - warmup) // 2 - 1
        assert lrs[mid] == pytest.approx((cfg.lr + cfg.lr * cfg.min_lr_ratio) / 2)
    # Past the end it stays at the floor.
    assert lr_at(total + 50, cfg, total) == pytest.approx(cfg.lr * cfg.min_lr_ratio)


def test_lr_cosine_values():
    cfg = TrainConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0)
    for step in (0, 24, 49, 74, 99):  # each step takes the schedule's value at its end
        assert lr_at(step, cfg, 100) == pytest.approx(
            0.5 * (1 + math.cos(math.pi * (step + 1) / 100)))
    assert lr_at(99, cfg, 100) == 0.0


def test_epochs_count_the_sequences_of_every_process():
    cfg = TrainConfig(max_steps=None, epochs=1.0, batch_size=4, grad_accum=2)
    assert planned_steps(cfg, 100, world_size=1) == 13  # ceil(100 / 8)
    assert planned_steps(cfg, 100, world_size=2) == 7   # 16 sequences a step: one pass, not two
    assert planned_steps(TrainConfig(max_steps=5), 100, world_size=4) == 5


# ------------------------------------------------------------------------ build_optimizer


def test_weight_decay_only_on_matrices():
    torch.manual_seed(0)
    model = Tiny()
    cfg = TrainConfig(weight_decay=0.1, lr=3e-4, beta1=0.8, beta2=0.99)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    assert set(by_decay) == {0.1, 0.0}
    matrices = {id(model.embed.weight), id(model.proj.weight)}  # head.weight is the embedding
    vectors = {id(model.norm.weight), id(model.norm.bias), id(model.proj.bias)}
    assert by_decay[0.1] == matrices
    assert by_decay[0.0] == vectors
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(3e-4)
        assert group["betas"] == (0.8, 0.99)
    # Each parameter is optimised exactly once, tied ones included.
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_frozen_parameters_are_not_optimised():
    model = Tiny(tied=False)
    model.embed.weight.requires_grad_(False)
    model.norm.bias.requires_grad_(False)
    optimizer = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.embed.weight) not in ids and id(model.norm.bias) not in ids
    assert id(model.head.weight) in ids


def test_optimizer_steps_on_cpu():
    torch.manual_seed(0)
    model = Tiny()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2), torch.device("cpu"))
    before = model.proj.weight.detach().clone()
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.proj.weight)


# ---------------------------------------------------------------------------- checkpoints


def _trained(model: torch.nn.Module):
    torch.manual_seed(0)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2), torch.device("cpu"))
    model(torch.tensor([[1, 2, 3, 4]])).logsumexp(-1).sum().backward()
    optimizer.step()
    return optimizer


def test_save_checkpoint_layout(tmp_path):
    model = Tiny()
    optimizer = _trained(model)
    root = tmp_path / "checkpoints"
    path = save_checkpoint(root, 7, model, optimizer, {"tokens_seen": 123, "data": {"epoch": 0}},
                           CONFIG)
    assert path == root / "step-000007"
    assert checkpoint_name(7) == "step-000007" and checkpoint_name(123456) == "step-123456"
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "optimizer.safetensors", "rng-rank0.safetensors",
            "state-rank0.json", "state.json", "config.yaml", COMPLETE_MARKER} <= names
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 7 and state["tokens_seen"] == 123 and state["data"] == {"epoch": 0}
    rank_state = json.loads((path / "state-rank0.json").read_text())
    assert "python" in rank_state["rng"] and "numpy" in rank_state["rng"]
    assert json.loads((path / COMPLETE_MARKER).read_text()) == {"step": 7}
    rng = read_tensors(path / "rng-rank0.safetensors")
    assert torch.equal(rng["torch_cpu"], torch.get_rng_state())
    opt = load_file(str(path / "optimizer.safetensors"))
    assert any(k.endswith("exp_avg") for k in opt) and any(k.endswith("exp_avg_sq") for k in opt)
    # Nothing but the finished folder is left in the root.
    assert [p.name for p in root.iterdir()] == ["step-000007"]


def test_saved_model_tensors_equal_parameters(tmp_path):
    model = Tiny(tied=False)
    optimizer = _trained(model)
    path = save_checkpoint(tmp_path, 3, model, optimizer, {}, CONFIG)
    saved = read_tensors(path / "model.safetensors")
    params = dict(model.named_parameters())
    assert set(saved) == set(params)
    for name, param in params.items():
        assert torch.equal(saved[name], param.detach()), name


def test_tied_parameters_are_stored_once(tmp_path):
    model = Tiny(tied=True)
    assert model.head.weight is model.embed.weight
    optimizer = _trained(model)
    path = save_checkpoint(tmp_path, 1, model, optimizer, {}, CONFIG)
    saved = read_tensors(path / "model.safetensors")
    shared = [name for name in saved if name in ("embed.weight", "head.weight")]
    assert len(shared) == 1
    assert torch.equal(saved[shared[0]], model.embed.weight.detach())
    assert len(saved) == len(list(model.parameters())) == 5
    assert len(trainable_state(model)) == 5


def test_trainable_state_skips_frozen(tmp_path):
    model = Tiny(tied=False)
    model.norm.weight.requires_grad_(False)
    assert "norm.weight" not in trainable_state(model)
    assert "proj.weight" in trainable_state(model)


def test_complete_checkpoints_ignores_partial_ones(tmp_path):
    model = Tiny()
    optimizer = _trained(model)
    root = tmp_path / "checkpoints"
    assert complete_checkpoints(root) == []  # no folder yet
    for step in (20, 5, 100):
        save_checkpoint(root, step, model, optimizer, {}, CONFIG)
    (root / "step-000200").mkdir()                     # interrupted: no COMPLETE
    (root / "step-000200" / "model.safetensors").write_bytes(b"partial")
    leftover = root / ".step-000300.tmp-99999"         # a killed save's temp folder
    leftover.mkdir()
    (leftover / COMPLETE_MARKER).write_text("{}")
    found = complete_checkpoints(root)
    assert [p.name for p in found] == ["step-000005", "step-000020", "step-000100"]


def test_resaving_a_step_replaces_it(tmp_path):
    model = Tiny(tied=False)
    optimizer = _trained(model)
    save_checkpoint(tmp_path, 4, model, optimizer, {"tokens_seen": 1}, CONFIG)
    with torch.no_grad():
        model.proj.weight.add_(1.0)
    path = save_checkpoint(tmp_path, 4, model, optimizer, {"tokens_seen": 2}, CONFIG)
    assert json.loads((path / "state.json").read_text())["tokens_seen"] == 2
    assert torch.equal(read_tensors(path / "model.safetensors")["proj.weight"],
                       model.proj.weight.detach())
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["step-000004"]


@pytest.mark.parametrize("hidden", [".step-000004.replaced", ".step-000004.tmp"])
def test_a_save_killed_between_its_renames_keeps_the_complete_copy(tmp_path, hidden):
    from ptft.engine.resume import find_checkpoint
    model = Tiny(tied=False)
    optimizer = _trained(model)
    root = tmp_path / "checkpoints"
    path = save_checkpoint(root, 4, model, optimizer, {"tokens_seen": 1}, CONFIG, keep_last=1)
    path.rename(root / hidden)  # re-saving step 4 with keep_last=1, killed mid-swap
    assert find_checkpoint("auto", tmp_path) == path
    assert json.loads((path / "state.json").read_text())["tokens_seen"] == 1
    assert sorted(p.name for p in root.iterdir()) == ["step-000004"]


def test_load_checkpoint_restores_weights_optimizer_and_rng(tmp_path):
    model = Tiny()
    optimizer = _trained(model)
    path = save_checkpoint(tmp_path, 5, model, optimizer, {"tokens_seen": 9}, CONFIG)
    expected_next = torch.rand(3)  # what the RNG gives right after the save
    fresh = Tiny()
    fresh_optimizer = build_optimizer(fresh, TrainConfig(), torch.device("cpu"))
    state = load_checkpoint(path, fresh, fresh_optimizer)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    for group_a, group_b in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        for key in group_a:
            assert torch.equal(group_a[key], group_b[key]), key
    restore_rng(state)
    assert torch.equal(torch.rand(3), expected_next)
    assert state["tokens_seen"] == 9 and (path / "config.yaml").read_text() == CONFIG


def test_keep_last_rotates_only_after_a_complete_save(tmp_path):
    model = Tiny()
    optimizer = _trained(model)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, optimizer, {}, CONFIG, keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000003", "step-000004"]


def test_a_checkpoint_with_pickled_files_is_refused(tmp_path):
    model = Tiny()
    optimizer = _trained(model)
    path = save_checkpoint(tmp_path, 1, model, optimizer, {}, CONFIG)
    torch.save({"evil": 1}, path / "extra.pt")
    with pytest.raises(UsageError, match="pickled"):
        load_checkpoint(path, Tiny(), build_optimizer(Tiny(), TrainConfig(), torch.device("cpu")))
