"""One low-precision copy of an activation that several projections read.

Under autocast every projection casts its input itself: a Llama layer's q, k and v projections
cast the same normed hidden states three times, its gate and up projections theirs twice, and
a projection that keeps its input for backward keeps its own copy (or the fp32 original). ptft's
own projection functions (the merged-weight LoRA) ask here instead: the last cast is kept,
keyed by the tensor (the one a view was taken of), its layout and its version counter, and handed out again while the same,
unchanged input comes back. So q, k and v share one bf16 copy, and backward reads that copy
rather than casting the fp32 input once more.

The copy lives as long as its source tensor (a weak reference drops it with the source), so
nothing outlives the step that made it. An in-place change of the source bumps its version and
misses the cache. Under torch.compile the cast is left to the compiled graph."""

from __future__ import annotations

import weakref

import torch

_last: dict = {"source": None, "key": None, "copy": None}


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`: x itself if it already is, else the kept copy while x is unchanged."""
    if x.dtype == dtype:
        return x
    if torch.compiler.is_compiling():
        return x.to(dtype)
    # Callers reshape their input first, so each sees a fresh view of the same tensor: the key
    # is the tensor the view was taken of, plus the view's own layout.
    base = x._base if x._base is not None else x
    key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version, dtype)
    source = _last["source"]
    if source is not None and source() is base and _last["key"] == key:
        return _last["copy"]
    copy = x.to(dtype)
    _last.update(source=weakref.ref(base, _forget), key=key, copy=copy)
    return copy


def _forget(reference: weakref.ref) -> None:
    """The source died: its copy goes with it (unless a newer source has replaced it)."""
    if _last["source"] is reference:
        _last.update(source=None, key=None, copy=None)


def clear() -> None:
    """Drop the kept copy now."""
    _last.update(source=None, key=None, copy=None)
