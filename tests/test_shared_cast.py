"""The low-precision copy that projections reading one input share (ptft/engine/shared_cast.py)."""

from __future__ import annotations

import gc

import torch

from ptft.engine import shared_cast


def test_views_of_one_unchanged_tensor_share_one_copy():
    shared_cast.clear()
    x = torch.randn(2, 3, 8)
    first = shared_cast.cast(x.reshape(-1, 8), torch.bfloat16)
    again = shared_cast.cast(x.reshape(-1, 8), torch.bfloat16)  # a fresh view, as q, k, v see
    assert again is first
    assert torch.equal(first, x.reshape(-1, 8).bfloat16())
    # another part of it, or another dtype, is another copy
    assert shared_cast.cast(x[0], torch.bfloat16) is not first
    assert shared_cast.cast(x[0], torch.float16).dtype == torch.float16
    # the dtype it already has: the tensor itself
    assert shared_cast.cast(x, torch.float32) is x


def test_a_changed_source_is_cast_again():
    shared_cast.clear()
    x = torch.randn(4, 8)
    first = shared_cast.cast(x, torch.bfloat16)
    x.mul_(2)  # in place: its version moves on
    second = shared_cast.cast(x, torch.bfloat16)
    assert second is not first
    assert torch.equal(second, x.bfloat16())


def test_the_copy_goes_with_its_source():
    shared_cast.clear()
    x = torch.randn(4, 8)
    copy = shared_cast.cast(x.view(2, 16), torch.bfloat16)
    assert shared_cast._last["copy"] is copy
    del x
    gc.collect()
    assert shared_cast._last["copy"] is None  # nothing outlives the step that made it
    assert copy.shape == (2, 16)  # who holds it (a backward) still has it
