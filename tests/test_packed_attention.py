"""Packed SFT attention sample by sample (samples of about one length together, padded): the
same losses and gradients as the block-diagonal mask (and as unpacked samples), not read from
the mask at all, short samples' SDPA in fp32 under autocast, and nothing of it saved."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ptft.config.schema import DataConfig, PromptTuningMethodConfig
from ptft.data.batches import IGNORE_INDEX
from ptft.data.sft import PackedSFT, save_samples, tokenize_sft
from ptft.engine.objective import accumulate_gradients, loss_sum
from ptft.engine.packed_attention import (NAME, PAD_SLACK, _length_groups, packed_sdpa_attention,
                                         use_packed_attention,
                                         uses_packed_attention)
from ptft.methods import apply_method
from tests.conftest import backward_node_names, tiny_llama
from tests.test_sft import records, tokenizer  # noqa: F401 (tokenizer: a fixture)

CPU = torch.device("cpu")


def _model(tokenizer, kv_heads: int = 2):
    return tiny_llama(vocab_size=320, num_key_value_heads=kv_heads,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.eos_token_id)


def _dataset(tmp_path, tokenizer, packing: bool) -> PackedSFT:
    folder = tmp_path / ("packed" if packing else "unpacked")
    if not folder.exists():
        folder.mkdir()
        tokens, flags, _ = tokenize_sft(records(40), tokenizer, DataConfig(), 96, False)
        save_samples(folder, tokens, flags, np.dtype(np.uint16))
    return PackedSFT(folder, 96, packing, tokenizer.pad_token_id)


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, [batch], "lm", CPU, None)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kv_heads", [2, 1])  # plain and grouped-query attention
def test_same_loss_and_gradients_as_the_mask(tmp_path, tokenizer, kv_heads):
    data = _dataset(tmp_path, tokenizer, True)
    batch = data.collate(range(len(data)))
    assert any(len(spans) > 1 for spans in batch.segments)  # rows hold several samples
    masked = _model(tokenizer, kv_heads)
    packed = copy.deepcopy(masked)
    assert use_packed_attention(packed, CPU) and uses_packed_attention(packed)
    assert not uses_packed_attention(masked)
    with torch.no_grad():
        want, got = loss_sum(masked, batch, "lm"), loss_sum(packed, batch, "lm")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want_grads, got_grads = _grads(masked, batch), _grads(packed, batch)
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The samples' boundaries alone decide: a mask that lets everything see everything
    # changes the masked model's loss, not the packed one's.
    leaky = copy.copy(batch)
    leaky.inputs = {**batch.inputs,
                    "attention_mask": torch.ones_like(batch.inputs["attention_mask"]).tril()}
    with torch.no_grad():
        assert not torch.allclose(loss_sum(masked, leaky, "lm"), want, rtol=1e-4)
        torch.testing.assert_close(loss_sum(packed, leaky, "lm"), want, rtol=1e-5, atol=1e-5)


def test_same_per_sample_losses_as_unpacked(tmp_path, tokenizer):
    packed_data, unpacked_data = (_dataset(tmp_path, tokenizer, p) for p in (True, False))
    model = _model(tokenizer)
    use_packed_attention(model, CPU)

    def losses(data):
        batch = data.collate(range(len(data)))
        inputs = {**batch.inputs}
        if batch.segments is not None:
            inputs["packed_segments"] = batch.segments
        with torch.no_grad():
            logits = model(**inputs).logits
        token = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(),
                                ignore_index=IGNORE_INDEX, reduction="none")
        token = token.view(batch.labels.shape)
        out = {}
        for row, spans in enumerate(_spans(data, batch)):
            for sample, (s, e) in spans:
                keep = batch.labels[row, s:e] != IGNORE_INDEX
                out[sample] = token[row, s:e][keep]
        return out

    a, b = losses(packed_data), losses(unpacked_data)
    assert a.keys() == b.keys()
    for sample in a:
        torch.testing.assert_close(a[sample], b[sample], rtol=1e-5, atol=1e-5)


def _spans(data, batch):
    for members in data.sequences:
        start, row = 0, []
        for sample in members:
            n = int(data.offsets[sample + 1] - data.offsets[sample]) - 1
            row.append((sample, (start, start + n)))
            start += n
        yield row


def test_samples_of_about_one_length_attend_together():
    lengths = [60, 55, 20, 60, 50, 17, 100]
    groups = _length_groups(lengths)
    assert groups == [[6], [0, 3, 1, 4], [2, 5]]
    for group in groups:  # longest first, none padded by more than the slack
        assert lengths[group[0]] == max(lengths[i] for i in group)
        assert all(lengths[group[0]] <= PAD_SLACK * lengths[i] for i in group)


@pytest.mark.parametrize("width", [32, 4])  # groups by blocks / groups by SDPA
def test_padded_groups_give_the_masks_outputs_and_gradients(width):
    segments = (((0, 100), (100, 190), (190, 250)), ((0, 95), (95, 180), (180, 256)))
    assert len(_length_groups([100, 90, 60, 95, 85, 76])) < 6  # some samples are padded
    module = tiny_llama(num_attention_heads=8, num_key_value_heads=4).model.layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, heads, 256, width, generator=generator).requires_grad_()
                         for heads in (8, 4, 4))
    grad_out = torch.randn(2, 256, 8, width, generator=generator)
    grad_out[0, 250:] = 0  # row 0's padding: no loss reads it
    got, _ = packed_sdpa_attention(module, query, key, value, None, segments, scaling=0.2)
    assert (width == 32) == ("_BlockedCausalAttentionBackward" in backward_node_names(got))
    got_grads = torch.autograd.grad(got, (query, key, value), grad_out)
    allowed = torch.zeros(2, 1, 256, 256, dtype=torch.bool)
    for row, spans in enumerate(segments):
        for start, end in spans:
            allowed[row, 0, start:end, start:end] = True
    allowed &= torch.ones(256, 256, dtype=torch.bool).tril()
    allowed[0, 0, 250:, 0] = True  # padding rows: any finite softmax
    want = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=0.2,
                                          enable_gqa=True).transpose(1, 2)
    want_grads = torch.autograd.grad(want, (query, key, value), grad_out)
    torch.testing.assert_close(got[0, :250], want[0, :250], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    for name, g, w in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


def test_samples_attend_in_fp32_under_autocast(tmp_path, tokenizer):
    """bf16 autocast would run SDPA in bf16 (slow on a CPU for small shapes): the packed
    attention computes in fp32 and hands back the autocast dtype."""
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 2, 12, 8, dtype=torch.bfloat16) for _ in range(3))
    segments = (((0, 5), (5, 12)), ((0, 9),))
    module = _model(tokenizer).model.layers[0].self_attn
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = packed_sdpa_attention(module, query, key, value, None, segments, scaling=0.3)
    want, _ = packed_sdpa_attention(module, query.float(), key.float(), value.float(), None,
                                    segments, scaling=0.3)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))
    # and a bf16 training step through it gives the masked model's loss and gradients
    data = _dataset(tmp_path, tokenizer, True)
    batch = data.collate(range(len(data)))
    masked = _model(tokenizer)
    packed = copy.deepcopy(masked)
    use_packed_attention(packed, CPU)
    masked.zero_grad(set_to_none=True)
    packed.zero_grad(set_to_none=True)
    want_loss, _ = accumulate_gradients(masked, [batch], "lm", CPU, torch.bfloat16)
    got_loss, _ = accumulate_gradients(packed, [batch], "lm", CPU, torch.bfloat16)
    torch.testing.assert_close(got_loss, want_loss, rtol=2e-2, atol=0)
    for (name, p), q in zip(masked.named_parameters(), packed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0.1, atol=0.02 * p.grad.abs().max().item(),
                                   msg=name)


def test_not_for_prompt_tuning_gpus_or_other_attention(tokenizer, tmp_path):
    prompt = apply_method(_model(tokenizer), PromptTuningMethodConfig(), "lm")
    assert not use_packed_attention(prompt, CPU)
    assert not use_packed_attention(_model(tokenizer), torch.device("cuda"))
    eager = _model(tokenizer)
    eager.set_attn_implementation("eager")
    assert not use_packed_attention(eager, CPU)
    model = _model(tokenizer)
    use_packed_attention(model, CPU)
    model.save_pretrained(tmp_path / "saved")
    assert NAME not in (tmp_path / "saved" / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert reloaded.config._attn_implementation != NAME
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == "llama"


def test_packing_refuses_a_sliding_window_shorter_than_the_samples_can_be():
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    from ptft.engine.packed_attention import check_sliding_window
    from ptft.errors import UsageError
    shape = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, intermediate_size=64)
    mistral = MistralForCausalLM(MistralConfig(sliding_window=4, **shape))
    with pytest.raises(UsageError, match="sliding window of 4 tokens"):
        check_sliding_window(mistral, packed=True, seq_len=8)
    check_sliding_window(mistral, packed=True, seq_len=4)   # no sample outgrows the window
    check_sliding_window(mistral, packed=False, seq_len=8)  # transformers' masks apply it
    qwen = Qwen2ForCausalLM(Qwen2Config(sliding_window=4, use_sliding_window=False, **shape))
    check_sliding_window(qwen, packed=True, seq_len=8)      # a window it does not use
    check_sliding_window(LlamaForCausalLM(LlamaConfig(**shape)), packed=True, seq_len=8)
