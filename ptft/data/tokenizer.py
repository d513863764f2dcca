"""Tokenizers: a byte-level BPE trained on the corpus (pre-training from scratch), or the
tokenizer that ships with a model directory.

A byte-level BPE (as in GPT-2) has no unknown tokens: any UTF-8 text, code included, encodes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerFast

# One token ends every document (and is the stop token when generating); one pads batches.
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Role markers of ptft's default chat template (ptft.data.sft): one token each, and text in
# a document can never produce them, so fine-tuning prompts stay unambiguous and short.
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Bump when training settings change, so cached tokenizers are retrained.
TOKENIZER_FORMAT_VERSION = 2


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with `vocab_size` entries (special tokens included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS],
        # All 256 bytes are in the vocabulary even if the corpus lacks some, so nothing is unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, additional_special_tokens=ROLE_TOKENS,
                                   model_max_length=1 << 30)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {path} has no end-of-sequence token; ptft ends every "
                         "document with one. Set eos_token in its tokenizer_config.json.")
    if tokenizer.pad_token_id is None:  # common for base models; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything in the tokenizer that decides the cached token ids: its definition
    (vocabulary, merges, normalisation, post-processing), which tokens are EOS, BOS and PAD, and
    what it adds around a text. The backend definition alone records none of the special-token
    roles (they live in tokenizer_config.json), yet EOS ends every document and SFT answer, so
    a model directory whose eos_token changed must not reuse the old tokens. The chat template
    is not part of it: only SFT uses it, and SFT keys it with its own settings (prepare.py)."""
    definition = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else repr(
        sorted(tokenizer.get_vocab().items()))
    roles = {"eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id,
             "pad": tokenizer.pad_token_id, "special": sorted(tokenizer.all_special_ids),
             # add_bos/add_eos settings (classification tokenises with special tokens) show in
             # what one short text becomes, whatever the tokenizer class calls them.
             "around_text": tokenizer("a", add_special_tokens=True)["input_ids"]}
    payload = definition + "\n" + json.dumps(roles, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
