"""Data preparation with an on-disk cache: records -> tokenizer -> token arrays -> datasets.

Each cached artefact lives in a folder named by a hash of everything that affects it (the
source description, the tokenizer's definition, the settings that shape samples, format
versions), is built under a temporary name and renamed into place when complete, so an
interrupted build is never mistaken for a finished one. A second run with the same data reads
the cache and reads no documents at all.

Three kinds of data, one result: `train` and `eval` datasets that collate batches.
    pretrain        documents -> one token stream cut into blocks (ptft.data.tokens)
    sft             chats -> masked, packed samples (ptft.data.sft)
    classification  texts + labels -> padded examples (ptft.data.classification)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptft.config.schema import RootConfig, Task
from ptft.data import classification, sft, sources, stdlib_tasks
from ptft.data.batches import Dataset
from ptft.data.tokenizer import TOKENIZER_FORMAT_VERSION, load_tokenizer, tokenizer_fingerprint, train_bpe
from ptft.data.tokens import TokenBlocks, id_bound, token_dtype, write_tokens
from ptft.errors import UsageError, first_line
from ptft.models import check_model_path
from ptft.tempdirs import temporary_sibling

# Bump when the token files' layout or the sample construction changes.
TOKENS_FORMAT_VERSION = 4  # 4: SFT conversations tokenised whole (ptft/data/sft.py)


@dataclass
class PreparedData:
    tokenizer: object
    task: str
    """lm (pre-training and SFT: next-token loss) or classification."""
    train: Dataset
    eval: Dataset
    meta: dict
    """What was prepared: token and sample counts, labels, dropped/truncated counts."""
    tokens_dir: Path
    tokenizer_cached: bool
    tokens_cached: bool

    @property
    def labels(self) -> list[str] | None:
        return self.meta.get("labels")


def resolve_task(cfg: RootConfig) -> str:
    """pretrain, sft or classification."""
    if cfg.stage.name == "pretrain":
        return "pretrain"
    if cfg.stage.task == Task.auto:
        return "classification" if cfg.data.source == "stdlib-topics" else "sft"
    return cfg.stage.task.value


def prepare_data(cfg: RootConfig) -> PreparedData:
    kind = resolve_task(cfg)
    cache = Path(cfg.data.cache_dir).expanduser()
    description = sources.describe_source(cfg.data)
    loaded: dict = {}

    def read():  # read lazily: a warm cache never needs the documents
        if "value" not in loaded:
            loaded["value"] = (sources.load_documents(cfg.data) if kind == "pretrain"
                               else sources.load_records(cfg.data))
        return loaded["value"]

    if cfg.model.path:
        tokenizer, tokenizer_cached = _model_tokenizer(cfg), True
    else:
        if kind != "pretrain":
            raise UsageError("fine-tuning needs a pre-trained model: set model.path=DIR.")
        key = sources.fingerprint({"source": description, "vocab_size": cfg.model.vocab_size,
                                   "format": TOKENIZER_FORMAT_VERSION})
        tok_dir = cache / "tokenizers" / key
        tokenizer_cached = tok_dir.is_dir()
        if not tokenizer_cached:
            with _building(tok_dir) as tmp:
                train_bpe(read().train, cfg.model.vocab_size).save_pretrained(tmp)
        tokenizer = load_tokenizer(tok_dir)
    if kind == "sft":
        sft.ensure_chat_template(tokenizer)

    settings = _sample_settings(cfg, kind, tokenizer)
    key = sources.fingerprint({"source": description, "tokenizer": tokenizer_fingerprint(tokenizer),
                               "settings": settings, "format": TOKENS_FORMAT_VERSION})
    tokens_dir = cache / "tokens" / key
    dtype = token_dtype(id_bound(tokenizer))
    tokens_cached = tokens_dir.is_dir()
    if not tokens_cached:
        with _building(tokens_dir) as tmp:
            meta = _BUILDERS[kind](cfg, read(), tokenizer, tmp, dtype)
            (tmp / "meta.json").write_text(json.dumps({**meta, "dtype": dtype.name,
                                                       "source": description}, indent=2))
    meta = json.loads((tokens_dir / "meta.json").read_text())
    train, evaluation = _open_datasets(cfg, kind, tokens_dir, np.dtype(meta["dtype"]), tokenizer)
    return PreparedData(tokenizer=tokenizer, task="classification" if kind == "classification"
                        else "lm", train=train, eval=evaluation, meta=meta, tokens_dir=tokens_dir,
                        tokenizer_cached=tokenizer_cached, tokens_cached=tokens_cached)


def _sample_settings(cfg: RootConfig, kind: str, tokenizer) -> dict:
    """Settings that change the prepared samples (and so the cache key)."""
    if kind == "pretrain":
        return {"kind": kind}  # blocks are cut at load time: seq_len is not part of the key
    settings = {"kind": kind, "seq_len": cfg.train.seq_len}
    if kind == "sft":
        settings.update(overlong=cfg.data.overlong.value, template=tokenizer.chat_template,
                        train_on_prompt=cfg.stage.train_on_prompt)
    return settings


def _build_pretrain(cfg, docs: sources.Documents, tokenizer, out: Path, dtype) -> dict:
    return {"train_tokens": write_tokens(docs.train, tokenizer, out / "train.bin", dtype),
            "eval_tokens": write_tokens(docs.eval, tokenizer, out / "eval.bin", dtype),
            "documents": {"train": len(docs.train), "eval": len(docs.eval)}}


def _build_sft(cfg, records: sources.Records, tokenizer, out: Path, dtype) -> dict:
    meta: dict = {}
    for split, rows in (("train", records.train), ("eval", records.eval)):
        tokens, flags, stats = sft.tokenize_sft(rows, tokenizer, cfg.data, cfg.train.seq_len,
                                                cfg.stage.train_on_prompt)
        if split == "train" and not tokens:
            raise UsageError(
                f"no training sample has a response token left to learn from ({stats.samples} "
                f"read; {stats.dropped_overlong} longer than train.seq_len={cfg.train.seq_len} "
                f"dropped, {stats.dropped_all_masked} with the response cut off). Raise "
                "train.seq_len or use data.overlong=truncate with shorter prompts.")
        (out / split).mkdir()
        sft.save_samples(out / split, tokens, flags, dtype)
        meta[split] = {"samples": len(tokens), "read": stats.samples, "truncated": stats.truncated,
                       "dropped_overlong": stats.dropped_overlong,
                       "dropped_all_masked": stats.dropped_all_masked,
                       "tokens": int(sum(stats.lengths))}
    return meta


def _build_classification(cfg, records: sources.Records, tokenizer, out: Path, dtype) -> dict:
    known = stdlib_tasks.TOPIC_LABELS if cfg.data.source == "stdlib-topics" else None
    labels = classification.label_names(records.train, cfg.data, known)
    if len(labels) < 2:
        raise UsageError(f"classification needs at least two labels in "
                         f"'{cfg.data.label_field}'; the training data has {labels}.")
    meta: dict = {"labels": labels}
    for split, rows in (("train", records.train), ("eval", records.eval)):
        tokens, label_ids, stats = classification.tokenize_examples(
            rows, tokenizer, cfg.data, labels, cfg.train.seq_len)
        (out / split).mkdir()
        classification.save_examples(out / split, tokens, label_ids, dtype)
        meta[split] = {**stats, "samples": stats["examples"],
                       "tokens": int(sum(len(t) for t in tokens))}
    return meta


_BUILDERS = {"pretrain": _build_pretrain, "sft": _build_sft,
             "classification": _build_classification}


def _open_datasets(cfg: RootConfig, kind: str, folder: Path, dtype, tokenizer):
    if kind == "pretrain":
        return (TokenBlocks(folder / "train.bin", dtype, cfg.train.seq_len),
                TokenBlocks(folder / "eval.bin", dtype, cfg.train.seq_len))
    if kind == "sft":
        # Prompt tuning prepends virtual tokens to each row: one sample per row only.
        packing = cfg.data.packing and cfg.method.name != "prompt_tuning"
        return tuple(sft.PackedSFT(folder / split, cfg.train.seq_len, packing,
                                   tokenizer.pad_token_id) for split in ("train", "eval"))
    return tuple(classification.ClassificationExamples(folder / split, tokenizer.pad_token_id)
                 for split in ("train", "eval"))


def _model_tokenizer(cfg: RootConfig):
    try:
        return load_tokenizer(check_model_path(cfg.model.path), cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageError(f"could not load the tokenizer of model.path={cfg.model.path}: "
                         f"{first_line(err)}") from None


class _building:
    """Build a cache folder under a temporary name; rename it into place only on success."""

    def __init__(self, final: Path):
        self.final = final

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_sibling(self.final)
        return self.tmp

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            os.rename(self.tmp, self.final)
        except OSError:  # another process finished the same build first; theirs is as good
            shutil.rmtree(self.tmp, ignore_errors=True)
