"""ptft's attention on a CPU: packed SFT sequences sample by sample, causal rows by blocks.

A packed row holds several samples; a block-diagonal causal mask keeps each one attending only
to itself. SDPA with an explicit mask cannot skip the masked blocks: it computes the whole
(seq x seq) score matrix of every row, though a row of five 100-token samples needs about a
fifth of the causal half of it. On a CPU the SDPA kernel runs at about a third of the matmul
rate, so attention is a large share of an SFT step (llama-tiny, seq 512, fp32: the step went
0.308 -> 0.247 s without the masked blocks).

Here, for batches that carry their sample boundaries (`packed_segments`: per row, the
(start, end) of each sample; the padding after them gets zeros, which nothing reads), each
sample attends on its own with a plain causal mask: the same causal softmax over the same
keys as the mask gives, so the same results, at the cost of the samples' own lengths. This is
what FlashAttention's variable-length kernels do on GPUs, where transformers' flash_attention_2
and position ids give it; GPU runs keep the masked SDPA here (a loop of small launches would
not pay there).

Samples of about the same length (within PAD_SLACK) attend together as one batch, the shorter
ones padded at their ends: causal queries never see the keys after them, so the padding
changes nothing they compute, and one call over a batch of samples runs its matmuls far
closer to the machine's rate than a call per sample.

Causal self-attention without a mask (pre-training rows, evaluation of unpadded rows) and
the packed samples long enough to pay go through ptft/engine/causal_attention.py, blocks of
queries by batched matmuls, faster on a CPU than the SDPA kernel at these sizes; short samples,
dropout, masks and anything else SDPA computes stay with SDPA.

Packed samples attend in fp32 whatever the autocast dtype. In bf16 their shapes would change
from batch to batch, and both bf16 kernels compile code for each new shape: SDPA's (one sample
at a time through 200 lengths: 5x the fp32 time, 2 GB RSS) and oneDNN's batched matmul (~0.5
ms per new shape, against ~0.03 ms to run one of these). Causal rows, whose shapes repeat
every step, take bf16 products (causal_attention.py). With bf16 products where they pay, the
harness's llama-small LoRA step was no faster than in fp32 (1.042 / 1.016 against 0.984 /
1.054 s, interleaved runs) and its peak RSS rose by ~150 MB, though 24 steps in process gained
~5%: its first steps meet mostly new shapes.

LoRA SFT steps under bf16 autocast on fresh docstrings batches (8 x 512 tokens, 2 CPU threads,
means of interleaved steps in one process): llama-tiny 164 ms a sample at a time -> 147 ms in
groups; llama-small 1.116 -> 1.089 s.

Registered with transformers as the attention implementation "ptft_packed_sdpa"; a saved model
does not record it (config.json holds no attention implementation).
"""

from __future__ import annotations

import torch

from ptft.engine.device import matmul_dtype

NAME = "ptft_packed_sdpa"
Segments = tuple[tuple[tuple[int, int], ...], ...]
"""Per batch row, the (start, end) positions of each packed sample, in order from 0."""


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          packed_segments: Segments | None = None, **kwargs):
    """transformers' attention-function signature: query (B, H, T, D), key and value
    (B, H_kv, T, D); returns ((B, T, H, D) output, None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_segments is None:
        if attention_mask is None and query.shape[2] == key.shape[2] \
                and _blocked_applies(module, query, kwargs):
            return _blocked(module, query, key, value, **kwargs).to(query.dtype), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with torch.autocast(query.device.type, enabled=False):
        out = _per_sample(module, query.float(), key.float(), value.float(), packed_segments,
                          **kwargs)
    return out.to(query.dtype), None


def _blocked_applies(module: torch.nn.Module, query: torch.Tensor, kwargs: dict) -> bool:
    """Whether causal self-attention of `query` over as many keys, with these arguments, is
    what ptft/engine/causal_attention.py computes (a plain causal softmax: no dropout, logit
    cap, bias or sinks) and faster there than in SDPA."""
    from ptft.engine.causal_attention import pays_for

    return (pays_for(query)
            and kwargs.get("is_causal", getattr(module, "is_causal", True)) is not False
            and not kwargs.get("dropout")
            and not kwargs.get("output_attentions")
            and all(kwargs.get(name) is None for name in _UNSUPPORTED))


# Attention arguments that change what is computed (transformers passes them by name).
_UNSUPPORTED = ("softcap", "sliding_window", "position_bias", "s_aux", "sinks")


def _blocked(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor, scaling: float | None = None, **_) -> torch.Tensor:
    """The causal blocks' attention in transformers' (B, T, H, D) layout, in the dtype of its
    products (causal_attention.py)."""
    from ptft.engine.causal_attention import causal_attention

    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    dtype = matmul_dtype(query.device, query.dtype)
    return causal_attention(query, key, value, scale, dtype).transpose(1, 2).contiguous()


PAD_SLACK = 1.2
"""Samples attend together, as one batch, when the longest is at most this many times the
length of each (the shorter ones padded at their ends). One call per sample ran each one's
small matmuls at a fraction of the rate a batch of them gets. llama-tiny LoRA SFT steps on
fresh docstrings batches under bf16 autocast, interleaved in one process, 2 CPU threads: 152 ms
at slack 1.0 (equal lengths only), 148 at 1.2, 152 at 1.5, 163 at 2.0."""


def _per_sample(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, packed_segments: Segments, **kwargs) -> torch.Tensor:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attend(q, k, v):  # samples of one length: (b, H, n, D) -> (b, n, H, D)
        if _blocked_applies(module, q, kwargs):
            return _blocked(module, q, k, v, **kwargs)
        return sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]

    length, heads, value_dim = query.shape[2], query.shape[1], value.shape[-1]
    # Pieces by unbind and split, not by slicing: their backward is one stack and one cat,
    # where each slice's backward would zero-fill a whole (B, H, T, D) gradient.
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (H, n, D) each
    row_samples: list[range] = []
    for q, k, v, spans in zip(query.unbind(0), key.unbind(0), value.unbind(0), packed_segments):
        covered = spans[-1][1] if spans else 0
        lengths = [end - start for start, end in spans] + [length - covered]
        first = len(samples)
        samples.extend(zip(q.split(lengths, dim=1)[:len(spans)], k.split(lengths, dim=1),
                           v.split(lengths, dim=1)))
        row_samples.append(range(first, len(samples)))
    outputs: list[torch.Tensor | None] = [None] * len(samples)  # (n, H, D) each
    for group in _length_groups([q.shape[1] for q, _, _ in samples]):
        longest = samples[group[0]][0].shape[1]
        # Zeros after a shorter sample change nothing it computes: its queries attend causally,
        # to keys before them; the padded queries' outputs are dropped (no gradient flows back).
        q, k, v = (torch.stack([_pad_to(samples[i][part], longest) for i in group])
                   for part in range(3))
        for i, out in zip(group, attend(q, k, v).unbind(0)):
            outputs[i] = out[:samples[i][0].shape[1]]
    rows = []
    for indices in row_samples:
        pieces = [outputs[i] for i in indices]
        covered = sum(piece.shape[0] for piece in pieces)
        if covered < length:  # the row's padding: its outputs carry no loss
            pieces.append(query.new_zeros(length - covered, heads, value_dim))
        rows.append(torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0])
    return torch.stack(rows)


def _length_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of the samples that attend together, longest first in each group: longest to
    shortest, a group takes samples while its longest is within PAD_SLACK of their length."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] <= PAD_SLACK * lengths[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _pad_to(piece: torch.Tensor, length: int) -> torch.Tensor:
    """(H, n, D) -> (H, length, D), zeros after."""
    if piece.shape[1] == length:
        return piece
    return torch.nn.functional.pad(piece, (0, 0, 0, length - piece.shape[1]))


def use_packed_attention(model: torch.nn.Module, device: torch.device) -> bool:
    """Switch `model` (a transformers model, under peft or not) from SDPA to the packed
    attention where it applies: on a CPU (in any precision), a model on
    transformers' SDPA attention interface, no virtual tokens (prompt tuning shifts every
    position). Returns whether it did."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from ptft.engine.flops import unwrap_model
    from ptft.engine.objective import is_prompt_learning

    base = unwrap_model(model)
    config = getattr(base, "config", None)
    if (device.type != "cpu"
            or getattr(config, "_attn_implementation", None) != "sdpa"
            or is_prompt_learning(model)
            or not hasattr(base, "set_attn_implementation")):
        return False
    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # masks built as for SDPA
    base.set_attn_implementation(NAME)
    return config._attn_implementation == NAME


def check_sliding_window(model: torch.nn.Module, packed: bool, seq_len: int) -> None:
    """Packed rows carry a block-diagonal mask (and this attention runs each sample with a
    plain causal mask): neither holds a sliding window, so a model that attends through one
    (Mistral, Gemma's local layers) would see further back than it was built to, in samples
    longer than the window. Unpacked batches get the window from transformers' own masks."""
    from ptft.engine.flops import unwrap_model

    config = getattr(unwrap_model(model), "config", None)
    window = sliding_window(config) if packed else None
    if window is not None and window < seq_len:
        from ptft.errors import UsageError
        raise UsageError(f"data.packing=true: the model attends through a sliding window of "
                         f"{window} tokens, which packed rows do not apply, and "
                         f"train.seq_len={seq_len} allows longer samples. Set "
                         f"data.packing=false, or train.seq_len<={window}.")


def sliding_window(config) -> int | None:
    """The window of a model with sliding-window attention in any layer, else None."""
    config = getattr(config, "get_text_config", lambda: config)()
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None  # Qwen2 carries a window that it does not use by default
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def uses_packed_attention(model: torch.nn.Module) -> bool:
    from ptft.engine.flops import unwrap_model

    return getattr(getattr(unwrap_model(model), "config", None), "_attn_implementation",
                   None) == NAME

