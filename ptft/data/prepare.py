"""Data preparation with an on-disk cache: documents -> tokenizer -> token arrays.

Each cached artefact lives in a folder named by a hash of everything that affects it (the
source description, the tokenizer's definition, format versions), is built under a temporary
name and renamed into place when complete, so an interrupted build is never mistaken for a
finished one. A second run with the same data reads the cache and reads no documents at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptft.config.schema import RootConfig
from ptft.data import sources
from ptft.data.tokenizer import TOKENIZER_FORMAT_VERSION, load_tokenizer, tokenizer_fingerprint, train_bpe
from ptft.data.tokens import token_dtype, write_tokens
from ptft.errors import UsageError, first_line
from ptft.models import check_model_path

# Bump when the token files' layout changes.
TOKENS_FORMAT_VERSION = 1


@dataclass
class PreparedData:
    tokenizer: object
    tokens_dir: Path
    dtype: np.dtype
    train_tokens: int
    eval_tokens: int
    documents: dict
    tokenizer_cached: bool
    tokens_cached: bool


def prepare_data(cfg: RootConfig) -> PreparedData:
    cache = Path(cfg.data.cache_dir).expanduser()
    description = sources.describe_source(cfg.data)
    documents: sources.Documents | None = None

    def docs() -> sources.Documents:  # read lazily: a warm cache never needs them
        nonlocal documents
        documents = documents or sources.load_documents(cfg.data)
        return documents

    if cfg.model.path:
        tokenizer, tokenizer_cached = _model_tokenizer(cfg), True
    else:
        key = sources.fingerprint({"source": description, "vocab_size": cfg.model.vocab_size,
                                   "format": TOKENIZER_FORMAT_VERSION})
        tok_dir = cache / "tokenizers" / key
        tokenizer_cached = tok_dir.is_dir()
        if not tokenizer_cached:
            with _building(tok_dir) as tmp:
                train_bpe(docs().train, cfg.model.vocab_size).save_pretrained(tmp)
        tokenizer = load_tokenizer(tok_dir)

    key = sources.fingerprint({"source": description, "tokenizer": tokenizer_fingerprint(tokenizer),
                               "format": TOKENS_FORMAT_VERSION})
    tokens_dir = cache / "tokens" / key
    dtype = token_dtype(len(tokenizer))
    tokens_cached = tokens_dir.is_dir()
    if not tokens_cached:
        with _building(tokens_dir) as tmp:
            d = docs()
            meta = {"train_tokens": write_tokens(d.train, tokenizer, tmp / "train.bin", dtype),
                    "eval_tokens": write_tokens(d.eval, tokenizer, tmp / "eval.bin", dtype),
                    "documents": {"train": len(d.train), "eval": len(d.eval)},
                    "dtype": dtype.name, "source": description}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    meta = json.loads((tokens_dir / "meta.json").read_text())
    return PreparedData(tokenizer=tokenizer, tokens_dir=tokens_dir, dtype=np.dtype(meta["dtype"]),
                        train_tokens=meta["train_tokens"], eval_tokens=meta["eval_tokens"],
                        documents=meta["documents"], tokenizer_cached=tokenizer_cached,
                        tokens_cached=tokens_cached)


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
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            os.rename(self.tmp, self.final)
        except OSError:  # another process finished the same build first; theirs is as good
            shutil.rmtree(self.tmp, ignore_errors=True)
