"""One copy of an activation that several projections read: a low-precision cast in forward,
a transposed copy in backward.

Under autocast every projection casts its input itself: a Llama layer's q, k and v projections
cast the same normed hidden states three times, its gate and up projections theirs twice, and
a projection that keeps its input for backward keeps its own copy (or the fp32 original). In
backward each weight gradient reduces over tokens, which oneDNN runs from a transposed copy of
one operand; for q, k and v that can be the one transposed input they share. ptft's own
projection functions (the oneDNN linear, the merged-weight LoRA) ask here instead of copying:
the last copy of each kind is kept, keyed by the source's storage, offset, shape, strides and
version counter, and handed out again while the same, unchanged data comes back (each caller
sees a fresh view of it: projections reshape their input to 2-D).

The slot holds the source itself as well, so its memory cannot be freed and reused by another
tensor with the same address while the key stands; an in-place change moves the version on and
misses. So at most one source and one copy of each kind outlive their use, until the next
request or clear(). Under torch.compile copies are left to the compiled graph."""

from __future__ import annotations

from typing import Callable

import torch


class _Slot:
    """The last copy of one kind, with what it was made from."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.source: torch.Tensor | None = None
        self.copy: torch.Tensor | None = None

    def get(self, x: torch.Tensor, kind, make: Callable[[torch.Tensor], torch.Tensor]):
        if torch.compiler.is_compiling():
            return make(x)
        key = (x.device, x.dtype, x.untyped_storage().data_ptr(), x.storage_offset(),
               tuple(x.shape), x.stride(), x._version, kind)
        if key != self.key:
            self.key, self.source, self.copy = key, x, make(x)
        return self.copy

    def clear(self) -> None:
        self.key = self.source = self.copy = None


_casts, _transposes = _Slot(), _Slot()


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`: x itself if it already is, else one copy while x's data is unchanged."""
    if x.dtype == dtype:
        return x
    return _casts.get(x, dtype, lambda t: t.to(dtype))


def transposed(x: torch.Tensor) -> torch.Tensor:
    """x^T of a 2-D x, contiguous: one copy while x's data is unchanged."""
    return _transposes.get(x, "t", lambda t: t.t().contiguous())


def clear() -> None:
    """Drop the kept sources and copies now."""
    _casts.clear()
    _transposes.clear()
