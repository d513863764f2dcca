"""SFT data on a real tokenizer and a real tiny model: masking, EOS, packing, accumulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from ptft.config.schema import DataConfig, Overlong
from ptft.data.batches import IGNORE_INDEX, TrainStream
from ptft.data.sft import PackedSFT, ensure_chat_template, pack, save_samples, tokenize_sft
from ptft.data.tokenizer import train_bpe
from ptft.engine.objective import accumulate_gradients

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def records(n: int, seed: int = 0) -> list[dict]:
    """Prompt/response pairs of varied lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 12))))
        response = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 8))))
        out.append({"prompt": f"Q{i}: {prompt}", "response": response, "_origin": f"row {i}"})
    return out


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_bpe([r["prompt"] + " " + r["response"] for r in records(200)] * 3, 320)
    ensure_chat_template(tok)
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def test_only_the_response_and_eos_carry_loss(tokenizer):
    record = {"prompt": "alpha beta gamma", "response": "delta epsilon"}
    [ids], [flags], stats = tokenize_sft([record], tokenizer, DataConfig(), 64, False)
    trained = [int(t) for t, f in zip(ids, flags) if f]
    assert tokenizer.decode(trained) == "delta epsilon" + tokenizer.eos_token
    assert trained[-1] == tokenizer.eos_token_id and ids[-1] == tokenizer.eos_token_id
    prompt_part = tokenizer.decode([int(t) for t, f in zip(ids, flags) if not f])
    assert "alpha beta gamma" in prompt_part and "<|assistant|>" in prompt_part
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids.tolist()  # one token
    [_], [all_flags], _ = tokenize_sft([record], tokenizer, DataConfig(), 64, True)
    assert all_flags.all()  # stage.train_on_prompt=true


def test_chat_messages_train_every_assistant_turn(tokenizer):
    chat = {"messages": [{"role": "user", "content": "alpha"},
                         {"role": "assistant", "content": "beta"},
                         {"role": "user", "content": "gamma"},
                         {"role": "assistant", "content": "delta"}]}
    [ids], [flags], _ = tokenize_sft([chat], tokenizer, DataConfig(), 64, False)
    trained = tokenizer.decode([int(t) for t, f in zip(ids, flags) if f])
    eos = tokenizer.eos_token
    assert trained == f"beta{eos}delta{eos}"


# Qwen2.5-style ChatML: EOS is <|im_end|> and every turn ends "<|im_end|>\n", so EOS is not
# the last token of an assistant turn.
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# A template that never emits EOS: turns end with a newline.
NO_EOS = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{{ message['content'] }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TWO_TURNS = [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "beta"},
             {"role": "user", "content": "gamma"}, {"role": "assistant", "content": "delta"}]


def _chatml_tokenizer(template: str):
    tok = train_bpe([r["prompt"] + " " + r["response"] for r in records(200)] * 3, 320)
    tok.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = template
    return tok


def test_chatml_tokens_are_the_rendered_template():
    tok = _chatml_tokenizer(CHATML)
    [ids], [flags], _ = tokenize_sft([{"messages": TWO_TURNS}], tok, DataConfig(), 64, False)
    rendered = tok.apply_chat_template(TWO_TURNS, tokenize=False)
    # What training sees is what inference renders: no extra EOS after a turn's newline.
    assert ids.tolist() == tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids.tolist().count(tok.eos_token_id) == len(TWO_TURNS)
    trained = tok.decode([int(t) for t, f in zip(ids, flags) if f])
    assert trained == "beta<|im_end|>\ndelta<|im_end|>\n"  # each answer learns its EOS


def test_template_without_eos_gets_one_after_the_final_answer_only():
    tok = _chatml_tokenizer(NO_EOS)
    [ids], [flags], _ = tokenize_sft([{"messages": TWO_TURNS}], tok, DataConfig(), 64, False)
    rendered = tok.apply_chat_template(TWO_TURNS, tokenize=False)
    assert ids.tolist() == [*tok(rendered, add_special_tokens=False)["input_ids"],
                            tok.eos_token_id]
    assert flags[-1]  # the stop token is learnt
    trained = tok.decode([int(t) for t, f in zip(ids, flags) if f])
    assert trained == "beta\ndelta\n<|im_end|>"


def test_sentencepiece_tokens_are_the_rendered_template():
    """A SentencePiece tokenizer marks the start of every text it is given as a word start
    ('▁'): tokenised segment by segment, the prompt's closing '[/INST] ' would end in a lone
    '▁' and the answer begin with another, tokens that inference, tokenising the whole
    rendering, never produces."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    texts = [f"[INST] {r['prompt']} [/INST] {r['response']}" for r in records(200)]
    spm = SentencePieceBPETokenizer()
    spm.train_from_iterator(texts * 3, vocab_size=300, special_tokens=["<unk>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=spm, unk_token="<unk>", eos_token="</s>")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
                         "{{ m['content'] }} [/INST] {% else %}{{ m['content'] }}{{ eos_token }}"
                         "{% endif %}{% endfor %}")
    [ids], [flags], _ = tokenize_sft([{"messages": TWO_TURNS}], tok, DataConfig(), 64, False)
    rendered = tok.apply_chat_template(TWO_TURNS, tokenize=False)
    assert ids.tolist() == tok(rendered, add_special_tokens=False)["input_ids"]
    # '▁beta' starts at the space the prompt segment ends with: it is the answer's token
    trained = tok.convert_ids_to_tokens([int(t) for t, f in zip(ids, flags) if f])
    assert trained == ["▁beta", "</s>", "▁delta", "</s>"]


def test_an_empty_final_answer_still_learns_its_eos(tokenizer):
    """A template that adds nothing after the answer renders an empty answer as no text at
    all: the sample still ends with the EOS the model must learn to stop with."""
    tok = _chatml_tokenizer("{% for m in messages %}{% if m['role'] == 'user' %}Q: "
                            "{{ m['content'] }}\nA:{% else %}{{ m['content'] }}{% endif %}"
                            "{% endfor %}")
    empty = [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": ""}]
    [ids], [flags], stats = tokenize_sft([{"messages": empty}], tok, DataConfig(), 64, False)
    assert ids[-1] == tok.eos_token_id and flags[-1] and not flags[:-1].any()
    assert stats.dropped_all_masked == 0


def test_overlong_samples_follow_the_policy(tokenizer):
    long = {"prompt": "alpha", "response": " ".join(["beta"] * 50)}
    prompt_heavy = {"prompt": " ".join(["gamma"] * 60), "response": "delta"}
    kept, _, stats = tokenize_sft([long, prompt_heavy], tokenizer, DataConfig(), 32, False)
    assert len(kept) == 1 and len(kept[0]) == 33  # truncated to seq_len + 1 tokens
    assert (stats.truncated, stats.dropped_all_masked) == (1, 1)
    kept, _, stats = tokenize_sft([long], tokenizer, DataConfig(overlong=Overlong.drop), 32, False)
    assert kept == [] and stats.dropped_overlong == 1


def test_pack_first_fit_decreasing_fills_sequences():
    lengths = [5, 9, 3, 7, 1, 4]
    bins = pack(lengths, 10, True)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 29 tokens need at least 3 sequences of 10
    assert pack(lengths, 10, False) == [[i] for i in range(6)]


def _dataset(tmp_path, tokenizer, packing: bool, seq_len: int = 64, n: int = 24) -> PackedSFT:
    folder = tmp_path / ("packed" if packing else "unpacked")
    if not folder.exists():
        folder.mkdir()
        tokens, flags, _ = tokenize_sft(records(n), tokenizer, DataConfig(), seq_len, False)
        save_samples(folder, tokens, flags, np.dtype(np.uint16))
    return PackedSFT(folder, seq_len, packing, tokenizer.pad_token_id)


def _per_sample_losses(model, dataset: PackedSFT) -> dict[int, torch.Tensor]:
    """Token losses of each sample, read back from whatever rows it was put in."""
    batch = dataset.collate(range(len(dataset)))
    with torch.no_grad():
        logits = model(**batch.inputs).logits
    losses = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(),
                             ignore_index=IGNORE_INDEX, reduction="none").view(batch.labels.shape)
    result = {}
    for row, members in enumerate(dataset.sequences):
        start = 0
        for sample in members:
            n = int(dataset.offsets[sample + 1] - dataset.offsets[sample]) - 1
            mask = batch.labels[row, start:start + n] != IGNORE_INDEX
            result[sample] = losses[row, start:start + n][mask]
            start += n
    return result


def _first_fit_decreasing(lengths, capacity):
    """The textbook version: each sample into the first bin (in opening order) with room."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@pytest.mark.parametrize("seed", range(5))
def test_pack_is_first_fit_decreasing_exactly(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    lengths = rng.integers(1, 513, size=n)
    lengths[rng.random(n) < 0.3] = rng.integers(1, 40)  # ties, as real data has
    lengths = lengths.tolist()
    assert pack(lengths, 512, True) == _first_fit_decreasing(lengths, 512)


def test_packed_and_unpacked_give_the_same_per_sample_losses(tmp_path, tokenizer, model):
    packed, unpacked = _dataset(tmp_path, tokenizer, True), _dataset(tmp_path, tokenizer, False)
    assert len(packed) < len(unpacked)  # packing did combine samples
    assert any(len(members) > 1 for members in packed.sequences)
    a, b = _per_sample_losses(model, packed), _per_sample_losses(model, unpacked)
    assert a.keys() == b.keys()
    for sample in a:
        torch.testing.assert_close(a[sample], b[sample], rtol=1e-5, atol=1e-5)


def test_packed_positions_restart_per_sample(tmp_path, tokenizer):
    packed = _dataset(tmp_path, tokenizer, True)
    row = next(i for i, members in enumerate(packed.sequences) if len(members) > 1)
    batch = packed.collate([row])
    positions = batch.inputs["position_ids"][0].tolist()
    first_len = int(packed.offsets[packed.sequences[row][0] + 1]
                    - packed.offsets[packed.sequences[row][0]]) - 1
    assert positions[:first_len] == list(range(first_len)) and positions[first_len] == 0
    mask = batch.inputs["attention_mask"][0, 0]
    assert not mask[first_len, first_len - 1]  # the second sample cannot see the first


def _gradients(model, dataset, batch_size: int, accum: int) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    stream = TrainStream(dataset, batch_size, seed=5)
    micro = [stream.next_batch() for _ in range(accum)]
    accumulate_gradients(model, micro, "lm", torch.device("cpu"), None)
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("packing", [True, False])
def test_batch_8_equals_batch_2_times_accum_4(tmp_path, tokenizer, model, packing):
    dataset = _dataset(tmp_path, tokenizer, packing, n=60)
    assert len(dataset) >= 8
    one = _gradients(model, dataset, 8, 1)
    four = _gradients(model, dataset, 2, 4)
    for g1, g4 in zip(one, four):
        torch.testing.assert_close(g1, g4, rtol=1e-4, atol=1e-6)
