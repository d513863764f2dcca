"""Tests for the token arrays on disk: their type, the blocks read from them, the sampler's
order and state, and the evaluation subset."""
import json

import numpy as np
import pytest
import torch

from ptft.data.batches import BlockSampler
from ptft.data.tokens import TokenBlocks, token_dtype


def test_token_dtype_widens_for_big_vocabularies():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_token_type_is_chosen_by_the_largest_id_not_the_vocabulary_size():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ptft.data.tokens import id_bound
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 70_000}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert tokenizer("a b")["input_ids"] == [1, 70_000]
    assert len(tokenizer) < 65_536 < id_bound(tokenizer)  # uint16 would wrap 70,000 to 4,464
    assert token_dtype(id_bound(tokenizer)) == np.uint32


@pytest.mark.parametrize("n,seq_len", [(1, 4), (4, 4), (5, 4), (9, 4), (10, 4), (23, 5), (64, 8)])
def test_token_blocks_shift_and_count(tmp_path, n, seq_len):
    path = tmp_path / "t.bin"
    tokens = (np.arange(n, dtype=np.uint16) * 7 + 3)
    tokens.tofile(path)
    blocks = TokenBlocks(path, np.dtype(np.uint16), seq_len)
    assert len(blocks) == (n - 1) // seq_len
    if not len(blocks):
        return
    order = list(range(len(blocks)))[::-1]
    batch = blocks.collate(order)
    inputs, targets = batch.inputs["input_ids"], batch.labels
    assert batch.num_targets == targets.numel()
    assert inputs.shape == targets.shape == (len(blocks), seq_len)
    assert inputs.dtype == targets.dtype == torch.int64
    for row, i in enumerate(order):
        assert inputs[row].tolist() == tokens[i * seq_len:i * seq_len + seq_len].tolist()
        assert targets[row].tolist() == tokens[i * seq_len + 1:i * seq_len + seq_len + 1].tolist()
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_an_evaluation_subset_spans_the_whole_split(tmp_path):
    from ptft.data.batches import eval_batches
    seq_len = 2
    np.arange(101, dtype=np.uint16).tofile(tmp_path / "t.bin")  # block i starts at token 2i
    blocks = TokenBlocks(tmp_path / "t.bin", np.dtype(np.uint16), seq_len)  # 50 blocks
    starts = [int(row[0]) // seq_len for batch in eval_batches(blocks, 4, 2)
              for row in batch.inputs["input_ids"]]
    assert starts == [0, 6, 12, 18, 25, 31, 37, 43]  # 8 blocks from all over, not the first 8
    everything = [int(row[0]) // seq_len for batch in eval_batches(blocks, 4, 0)
                  for row in batch.inputs["input_ids"]]
    assert everything == list(range(50))


def test_token_blocks_of_empty_file(tmp_path):
    (tmp_path / "t.bin").write_bytes(b"")
    assert len(TokenBlocks(tmp_path / "t.bin", np.dtype(np.uint16), 4)) == 0


def test_sampler_visits_every_block_once_per_epoch_and_straddles():
    sampler = BlockSampler(num_blocks=10, batch_size=3, seed=7)
    batches = [sampler.next_batch() for _ in range(10)]  # 30 indices: exactly 3 epochs
    assert all(len(b) == 3 for b in batches)
    flat = [i for b in batches for i in b]
    epochs = [flat[0:10], flat[10:20], flat[20:30]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(10))
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # reshuffled each epoch
    # Batch 4 (indices 9..11) straddles epochs 0 and 1.
    assert batches[3] == [epochs[0][9], epochs[1][0], epochs[1][1]]
    assert sampler.state_dict() == {"epoch": 2, "position": 10}
    assert sampler.next_batch() == list(sampler._permutation(3)[:3])
    assert sampler.state_dict() == {"epoch": 3, "position": 3}


def test_sampler_order_is_fixed_by_seed():
    def first_epoch(seed):
        return BlockSampler(50, 50, seed=seed).next_batch()

    assert first_epoch(1) == first_epoch(1)
    assert first_epoch(1) != first_epoch(2)
    assert first_epoch(1) != list(range(50))  # shuffled


@pytest.mark.parametrize("taken", [0, 1, 3, 4, 7, 9])
def test_sampler_state_dict_reproduces_continuation(taken):
    reference = BlockSampler(num_blocks=10, batch_size=4, seed=3)
    for _ in range(taken):
        reference.next_batch()
    state = reference.state_dict()
    expected = [reference.next_batch() for _ in range(8)]

    resumed = BlockSampler(num_blocks=10, batch_size=4, seed=3)
    resumed.next_batch()  # a fresh sampler in some other position
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives JSON (state.json)
    assert [resumed.next_batch() for _ in range(8)] == expected
