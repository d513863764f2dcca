"""The copies that projections reading one input share (ptft/engine/shared_copies.py)."""

from __future__ import annotations

import torch

from ptft.engine import shared_copies


def test_views_of_one_unchanged_tensor_share_one_copy():
    shared_copies.clear()
    x = torch.randn(2, 3, 8)
    first = shared_copies.cast(x.reshape(-1, 8), torch.bfloat16)
    again = shared_copies.cast(x.reshape(-1, 8), torch.bfloat16)  # a fresh view, as q, k, v see
    assert again is first
    assert torch.equal(first, x.reshape(-1, 8).bfloat16())
    # another part of it, or another dtype, is another copy
    assert shared_copies.cast(x[0], torch.bfloat16) is not first
    assert shared_copies.cast(x[0], torch.float16).dtype == torch.float16
    # the dtype it already has: the tensor itself
    assert shared_copies.cast(x, torch.float32) is x


def test_a_changed_source_is_cast_again():
    shared_copies.clear()
    x = torch.randn(4, 8)
    first = shared_copies.cast(x, torch.bfloat16)
    x.mul_(2)  # in place: its version moves on
    second = shared_copies.cast(x, torch.bfloat16)
    assert second is not first
    assert torch.equal(second, x.bfloat16())


def test_transposed_copies_are_shared_and_dropped_on_clear():
    shared_copies.clear()
    x = torch.randn(6, 4)
    first = shared_copies.transposed(x.view(6, 4))
    assert first.is_contiguous() and torch.equal(first, x.t())
    assert shared_copies.transposed(x.view(6, 4)) is first
    assert shared_copies.cast(x, torch.bfloat16) is not None  # another kind: its own slot
    assert shared_copies.transposed(x) is first
    shared_copies.clear()
    assert shared_copies.transposed(x) is not first


def test_a_new_tensor_where_an_old_one_was_is_not_mistaken_for_it():
    # The slot keeps its source alive, so no other tensor can take its memory (and its key)
    # while the copy is kept.
    shared_copies.clear()
    first = shared_copies.transposed(torch.full((64, 8), 1.0))
    for value in range(2, 22):
        other = torch.full((64, 8), float(value))
        assert torch.equal(shared_copies.transposed(other), other.t())
        del other
    assert torch.equal(first, torch.full((8, 64), 1.0))
