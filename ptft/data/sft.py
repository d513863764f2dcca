"""Instruction tuning (SFT) data: chat rendering, prompt masking, packing.

Every record becomes a conversation (prompt/response records are a user and an assistant
message) rendered with the tokenizer's chat template; the sample's tokens are exactly that
rendering. Only assistant tokens carry loss, EOS included, so the model learns to answer and
to stop (a template that never emits EOS gets one after the final answer). Short samples
are packed into one sequence; a block-diagonal causal mask keeps each sample attending only
to itself and position ids restart per sample, so a packed batch gives the same per-sample
losses as the same samples unpacked.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ptft.config.schema import DataConfig, Overlong
from ptft.data.batches import IGNORE_INDEX, Batch
from ptft.errors import UsageError

# Set on tokenizers that have no chat template (ours, base models); saved with the model.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def to_messages(record: dict, cfg: DataConfig) -> list[dict]:
    """A record as a chat: its `messages` column, or its prompt and response."""
    origin = record.get("_origin", "a record")
    if record.get(cfg.messages_field) is not None:
        messages = record[cfg.messages_field]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise UsageError(f"{origin}: '{cfg.messages_field}' must be a list of "
                             "{role, content} messages.")
        return messages
    missing = [f for f in (cfg.prompt_field, cfg.response_field) if record.get(f) is None]
    if missing:
        columns = ", ".join(k for k in record if k != "_origin")
        raise UsageError(f"{origin} has no '{missing[0]}' (columns: {columns}); set "
                         f"data.prompt_field / data.response_field, or give a "
                         f"'{cfg.messages_field}' column.")
    return [{"role": "user", "content": str(record[cfg.prompt_field])},
            {"role": "assistant", "content": str(record[cfg.response_field])}]


def render_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """The rendered chat as (text, is_answer) segments, in order. Rendering the conversation
    one message at a time finds where each message starts in the full text, whatever the
    template, so assistant turns can be marked for loss."""
    def render(upto: int, generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False,
                                             add_generation_prompt=generation_prompt)

    segments: list[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(messages):
        is_answer = message["role"] == "assistant"
        if is_answer and k > 0:  # the template's "assistant:" header belongs to the prompt
            head = render(k, generation_prompt=True)
            if head.startswith(done) and len(head) > len(done):
                segments.append((head[len(done):], False))
                done = head
        text = render(k + 1)
        if not text.startswith(done):
            raise UsageError("the tokenizer's chat template does not render a conversation "
                             "as a growing prefix, so prompt tokens cannot be masked; use a "
                             "model with a standard chat template.")
        segments.append((text[len(done):], is_answer))
        done = text
    return segments


def _tokenize_rendered(all_segments: list[list[tuple[str, bool]]],
                       tokenizer) -> list[list[tuple[list[int], bool]]]:
    """Per conversation, its tokens as (ids, is_answer) pieces: the whole rendering tokenised
    at once, as inference tokenises it, each token marked by the segments its characters
    come from (a token that reaches into an answer is the answer's, as transformers' assistant
    masks have it). Segment by segment would differ where the tokenizer treats the start of a
    text specially: a SentencePiece tokenizer (Llama 2, Mistral) puts a word-start mark on
    every segment's first word, which the whole text has only at its start. A tokenizer
    without character offsets (a slow one) is run segment by segment."""
    texts = ["".join(text for text, _ in segments) for segments in all_segments]
    if not texts:
        return []
    if not getattr(tokenizer, "is_fast", False):
        flat = [text for segments in all_segments for text, _ in segments]
        flat_ids = iter(tokenizer(flat, add_special_tokens=False)["input_ids"])
        return [[(list(next(flat_ids)), is_answer) for _, is_answer in segments]
                for segments in all_segments]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for segments, ids, offsets in zip(all_segments, encoded["input_ids"],
                                      encoded["offset_mapping"]):
        ends = list(itertools.accumulate(len(text) for text, _ in segments))
        answers = [is_answer for _, is_answer in segments]
        last = len(segments) - 1

        def segment_at(char: int) -> int:
            return min(bisect.bisect_right(ends, char), last)

        pieces: list[tuple[list[int], bool]] = []
        for token, (start, end) in zip(ids, offsets):
            is_answer = any(answers[segment_at(start):segment_at(max(start, end - 1)) + 1])
            if pieces and pieces[-1][1] == is_answer:
                pieces[-1][0].append(token)
            else:
                pieces.append(([token], is_answer))
        if answers[-1] and not (pieces and pieces[-1][1]):
            pieces.append(([], True))  # an empty final answer: still the place for its EOS
        out.append(pieces)
    return out


@dataclass
class SFTStats:
    samples: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_all_masked: int = 0
    lengths: list[int] = field(default_factory=list)


def tokenize_sft(records: list[dict], tokenizer, cfg: DataConfig, seq_len: int,
                 train_on_prompt: bool) -> tuple[list[np.ndarray], list[np.ndarray], SFTStats]:
    """(token ids, trains flags) per kept sample. A sample is at most seq_len + 1 tokens:
    seq_len inputs and seq_len next-token targets."""
    eos = tokenizer.eos_token_id
    stats = SFTStats()
    all_segments = [render_segments(to_messages(r, cfg), tokenizer) for r in records]
    tokenized = _tokenize_rendered(all_segments, tokenizer)
    tokens_out, flags_out = [], []
    for pieces in tokenized:
        # The tokens are the template's rendering, unchanged: a template that ends its turns
        # with EOS (ours; ChatML's `<|im_end|>\n`, where EOS is not the turn's last token)
        # already gives the model its stop token to learn in every answer. Only a template
        # that never emits EOS gets one, once, after the final answer: the model must learn
        # to stop, and an EOS inserted mid-chat would give later turns a context that
        # inference (which renders the same template) never shows.
        if (pieces and pieces[-1][1]
                and not any(eos in piece for piece, is_answer in pieces if is_answer)):
            pieces[-1][0].append(eos)
        ids: list[int] = []
        flags: list[bool] = []
        for piece, is_answer in pieces:
            ids += piece
            flags += [is_answer or train_on_prompt] * len(piece)
        stats.samples += 1
        overlong = len(ids) > seq_len + 1
        if overlong:
            if cfg.overlong == Overlong.drop:
                stats.dropped_overlong += 1
                continue
            ids, flags = ids[:seq_len + 1], flags[:seq_len + 1]
        if not any(flags[1:]):  # nothing to learn: a prompt that fills the whole sequence
            stats.dropped_all_masked += 1
            continue
        stats.truncated += overlong
        tokens_out.append(np.asarray(ids, dtype=np.int64))
        flags_out.append(np.asarray(flags, dtype=np.bool_))
        stats.lengths.append(len(ids) - 1)
    return tokens_out, flags_out, stats


def save_samples(path: Path, tokens: list[np.ndarray], flags: list[np.ndarray], dtype) -> None:
    lengths = np.asarray([len(t) for t in tokens], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.save(path / "tokens.npy", np.concatenate(tokens).astype(dtype) if tokens else np.zeros(0, dtype))
    np.save(path / "flags.npy", np.concatenate(flags) if flags else np.zeros(0, np.bool_))
    np.save(path / "offsets.npy", offsets)


def pack(lengths: Sequence[int], capacity: int, enabled: bool) -> list[list[int]]:
    """Group sample indices into sequences of at most `capacity` tokens (first-fit
    decreasing: little padding, same result on every machine). Disabled: one per sequence."""
    if not enabled:
        return [[i] for i in range(len(lengths))]
    # "The first bin with room" is found in a max-tree over the bins' free room, in O(log n)
    # per sample: scanning the bins one by one made packing quadratic (40,000 samples took
    # 6 s, a few hundred thousand minutes, every time a dataset was opened).
    size = 1 << max(0, len(lengths) - 1).bit_length()  # a leaf per possible bin
    most_room = [-1] * (2 * size)  # node: the most room of the bins below it (-1: none yet)
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = lengths[i]
        if most_room[1] >= need:  # descend to the leftmost bin that fits
            node = 1
            while node < size:
                node = 2 * node if most_room[2 * node] >= need else 2 * node + 1
            b = node - size
            bins[b].append(i)
            free = most_room[node] - need
        else:
            b, node = len(bins), size + len(bins)
            bins.append([i])
            free = capacity - need
        most_room[node] = free
        node //= 2
        while node:
            most_room[node] = max(most_room[2 * node], most_room[2 * node + 1])
            node //= 2
    return bins


class PackedSFT:
    """Training sequences of one or more samples, each with its own mask and positions."""

    def __init__(self, path: Path, seq_len: int, packing: bool, pad_id: int):
        self.tokens = np.load(path / "tokens.npy", mmap_mode="r")
        self.flags = np.load(path / "flags.npy", mmap_mode="r")
        self.offsets = np.load(path / "offsets.npy")
        self.seq_len, self.pad_id, self.packing = seq_len, pad_id, packing
        lengths = (np.diff(self.offsets) - 1).tolist()
        self.sequences = pack(lengths, seq_len, packing)

    def __len__(self) -> int:
        return len(self.sequences)

    def samples(self) -> int:
        return len(self.offsets) - 1

    def collate(self, indices: Sequence[int]) -> Batch:
        rows = [self._sequence(self.sequences[i]) for i in indices]
        width = max(len(r[0]) for r in rows)
        B = len(rows)
        input_ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((B, width), dtype=torch.long)
        segment = torch.full((B, width), -1, dtype=torch.long)
        for b, (ids, targets, pos, seg, _) in enumerate(rows):
            n = len(ids)
            input_ids[b, :n], labels[b, :n] = ids, targets
            positions[b, :n], segment[b, :n] = pos, seg
        num_targets = int((labels != IGNORE_INDEX).sum())
        if not self.packing:  # one sample per row: a padding mask is all the model needs
            return Batch({"input_ids": input_ids, "attention_mask": (segment >= 0).long()},
                         labels, num_targets)
        # Block-diagonal causal mask: a token sees earlier tokens of its own sample only.
        # Padding (segment -1) sees itself, so no attention row is empty (that gives NaN).
        same = segment[:, :, None] == segment[:, None, :]
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
        mask = (same & causal) | torch.eye(width, dtype=torch.bool)
        spans = tuple(row[4] for row in rows)  # each sample's (start, end), for the attention
        return Batch({"input_ids": input_ids, "position_ids": positions,
                      "attention_mask": mask[:, None]}, labels, num_targets, spans)

    def _sequence(self, members: list[int]):
        """One row's inputs, targets, positions and sample index per token, and each sample's
        (start, end) in it."""
        ids, targets, pos, seg, spans = [], [], [], [], []
        for s, i in enumerate(members):
            start, end = self.offsets[i], self.offsets[i + 1]
            tokens = torch.from_numpy(self.tokens[start:end].astype(np.int64))
            trains = torch.from_numpy(self.flags[start:end].copy())
            n = len(tokens) - 1
            ids.append(tokens[:-1])
            targets.append(torch.where(trains[1:], tokens[1:], IGNORE_INDEX))
            pos.append(torch.arange(n))
            seg.append(torch.full((n,), s))
            begin = spans[-1][1] if spans else 0
            spans.append((begin, begin + n))
        return torch.cat(ids), torch.cat(targets), torch.cat(pos), torch.cat(seg), tuple(spans)
