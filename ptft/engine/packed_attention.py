"""ptft's attention on a CPU: packed SFT sequences one sample at a time, causal rows by blocks.

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

The samples attend in fp32 whatever the autocast dtype: autocast would run SDPA in bf16, and
the CPU's bf16 kernel is slow on small shapes and keeps memory for each new one (one sample at
a time through 200 lengths: 5x the fp32 time, 2 GB RSS). In fp32, llama-small SFT under bf16
autocast (8 x 512 tokens, one harness run each) went from a 1.75 to a 1.57 s step (full
fine-tuning), 1.49 to 1.19 s (LoRA) and 1.31 to 1.01 s (adapters) against the masked bf16
SDPA; the fp32 copies of queries, keys and values that backward keeps cost LoRA 16% more peak
RSS there (still 0.85x of full fine-tuning's).

Causal self-attention without a mask (pre-training rows, evaluation of unpadded rows) and
the packed samples long enough to pay go through ptft/engine/causal_attention.py, blocks of
queries by batched matmuls, faster on a CPU than the SDPA kernel at these sizes; short samples,
dropout, masks and anything else SDPA computes stay with SDPA.

Registered with transformers as the attention implementation "ptft_packed_sdpa"; a saved model
does not record it (config.json holds no attention implementation).
"""

from __future__ import annotations

import torch

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
    """The causal blocks' attention in transformers' (B, T, H, D) layout, fp32."""
    from ptft.engine.causal_attention import causal_attention

    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return causal_attention(query, key, value, scale).transpose(1, 2).contiguous()


def _per_sample(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, packed_segments: Segments, **kwargs) -> torch.Tensor:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attend(q, k, v):  # one sample: (1, H, n, D) -> (1, n, H, D)
        if _blocked_applies(module, q, kwargs):
            return _blocked(module, q, k, v, **kwargs)
        return sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]

    length, heads, value_dim = query.shape[2], query.shape[1], value.shape[-1]
    # Pieces by unbind and split, not by slicing: their backward is one stack and one cat,
    # where each slice's backward would zero-fill a whole (B, H, T, D) gradient.
    rows = []
    for q, k, v, spans in zip(query.unbind(0), key.unbind(0), value.unbind(0), packed_segments):
        covered = spans[-1][1] if spans else 0
        lengths = [end - start for start, end in spans] + [length - covered]
        pieces = [attend(q_[None], k_[None], v_[None])
                  for q_, k_, v_, _ in zip(q.split(lengths, dim=1), k.split(lengths, dim=1),
                                           v.split(lengths, dim=1), spans)]
        if covered < length:  # the row's padding: its outputs carry no loss
            pieces.append(query.new_zeros(1, length - covered, heads, value_dim))
        rows.append(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])
    return torch.cat(rows, dim=0)


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

