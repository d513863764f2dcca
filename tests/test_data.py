"""Tests for reading documents, writing token arrays, the BPE tokenizer and the prepare cache,
on small real files under tmp_path (the blocks read back: test_token_blocks.py)."""
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ptft.config.compose import compose, to_object
from ptft.config.schema import DataConfig
from ptft.data.prepare import prepare_data
from ptft.data.sources import describe_source, load_documents
from ptft.data.tokenizer import EOS_TOKEN, load_tokenizer, tokenizer_fingerprint, train_bpe
from ptft.data.tokens import token_dtype, write_tokens
from ptft.errors import UsageError

WORDS = ("the cat sat on a mat while small dogs ran over green hills and river banks "
         "under bright blue skies with clouds").split()


def sentences(n: int, offset: int = 0) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(4 + i % 7)) + f" {i + offset}."
            for i in range(n)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "n": i}) + "\n" for i, t in enumerate(texts)),
                    encoding="utf-8")
    return path


def cfg_for(source: str, paths, **kw) -> DataConfig:
    return DataConfig(source=source, paths=[str(p) for p in paths], **kw)


def everything(docs) -> list[str]:
    return sorted(docs.train + docs.eval)


# --------------------------------------------------------------------------------- sources


def test_text_files_one_document_per_file(tmp_path):
    texts = [f"File {i}\nsecond line\n\nparagraph after a blank line\n" for i in range(4)]
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(text, encoding="utf-8")
    docs = load_documents(cfg_for("text-files", sorted(tmp_path.glob("*.txt"))))
    assert everything(docs) == sorted(texts)  # whole files, blank lines and all


def test_jsonl_reads_text_field(tmp_path):
    texts = sentences(6)
    docs = load_documents(cfg_for("jsonl", [write_jsonl(tmp_path / "c.jsonl", texts)]))
    assert everything(docs) == sorted(texts)


def test_jsonl_custom_text_field(tmp_path):
    texts = sentences(5)
    path = write_jsonl(tmp_path / "c.jsonl", texts, field="body")
    docs = load_documents(cfg_for("jsonl", [path], text_field="body"))
    assert everything(docs) == sorted(texts)


def test_csv_reads_quoted_text(tmp_path):
    texts = [f"row {i}, with a comma" for i in range(5)]
    path = tmp_path / "c.csv"
    path.write_text("id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(texts)),
                    encoding="utf-8")
    docs = load_documents(cfg_for("csv", [path]))
    assert everything(docs) == sorted(texts)


def test_parquet_reads_text_column(tmp_path):
    texts = sentences(5)
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": texts, "n": list(range(5))}), path)
    docs = load_documents(cfg_for("parquet", [path]))
    assert everything(docs) == sorted(texts)


def test_glob_patterns_expand(tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub" / "b.txt").write_text("beta text")
    (tmp_path / "sub" / "deep" / "c.txt").write_text("gamma text")
    (tmp_path / "sub" / "skip.md").write_text("not matched")
    docs = load_documents(DataConfig(source="text-files", paths=[str(tmp_path / "*.txt")]))
    assert everything(docs) == ["alpha text"]
    docs = load_documents(DataConfig(source="text-files",
                                     paths=[str(tmp_path / "**" / "*.txt")]))
    assert everything(docs) == ["alpha text", "beta text", "gamma text"]


def test_max_documents_across_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ["a0", "a1"])
    b = write_jsonl(tmp_path / "b.jsonl", ["b0", "b1", "b2"])
    docs = load_documents(cfg_for("jsonl", [a, b], max_documents=3))
    assert everything(docs) == ["a0", "a1", "b0"]


def test_eval_fraction_holds_out_at_least_one_never_all(tmp_path):
    texts = sentences(5)
    path = write_jsonl(tmp_path / "c.jsonl", texts)
    # A tiny fraction still holds out one document, so evaluation has data.
    docs = load_documents(cfg_for("jsonl", [path], eval_fraction=0.02))
    assert len(docs.eval) >= 1 and len(docs.train) >= 1
    assert everything(docs) == sorted(texts)
    assert not set(docs.eval) & set(docs.train)
    # A fraction of 1 still leaves something to train on.
    docs = load_documents(cfg_for("jsonl", [path], eval_fraction=1.0))
    assert len(docs.train) >= 1 and len(docs.eval) == len(texts) - len(docs.train)
    # Zero: no evaluation split.
    docs = load_documents(cfg_for("jsonl", [path], eval_fraction=0.0))
    assert docs.eval == [] and sorted(docs.train) == sorted(texts)


def test_eval_fraction_is_roughly_respected(tmp_path):
    texts = sentences(400)
    docs = load_documents(cfg_for("jsonl", [write_jsonl(tmp_path / "c.jsonl", texts)],
                                  eval_fraction=0.25))
    assert 60 <= len(docs.eval) <= 140
    assert len(docs.train) + len(docs.eval) == 400


def test_eval_paths_are_the_eval_split(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sentences(6))
    held = write_jsonl(tmp_path / "eval.jsonl", ["held out one", "held out two"])
    docs = load_documents(cfg_for("jsonl", [train], eval_paths=[str(held)], eval_fraction=0.5))
    assert docs.eval == ["held out one", "held out two"]
    assert docs.train == sentences(6)  # eval_fraction is ignored: nothing else held out


def test_held_out_split_is_stable_when_documents_are_added(tmp_path):
    path = tmp_path / "c.jsonl"
    first = sentences(40)
    before = load_documents(cfg_for("jsonl", [write_jsonl(path, first)], eval_fraction=0.25))
    assert before.eval and before.train
    after = load_documents(cfg_for("jsonl", [write_jsonl(path, first + sentences(60, 1000))],
                                   eval_fraction=0.25))
    assert set(before.eval) <= set(after.eval), "a held-out document moved into training"
    assert set(before.train) <= set(after.train), "a training document moved into eval"
    assert len(after.eval) > len(before.eval)


def test_missing_file_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "nothing-*.txt")
    with pytest.raises(UsageError) as info:
        load_documents(DataConfig(source="text-files", paths=[pattern]))
    assert pattern in str(info.value)
    assert "data.paths" in str(info.value)


def test_missing_eval_file_names_eval_paths(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sentences(3))
    with pytest.raises(UsageError) as info:
        load_documents(cfg_for("jsonl", [train], eval_paths=[str(tmp_path / "gone.jsonl")]))
    assert "data.eval_paths" in str(info.value) and "gone.jsonl" in str(info.value)


def test_empty_paths_are_rejected():
    with pytest.raises(UsageError, match="data.paths"):
        load_documents(DataConfig(source="jsonl", paths=[]))


def test_wrong_text_field_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", sentences(3), field="content")
    with pytest.raises(UsageError) as info:
        load_documents(cfg_for("jsonl", [path], text_field="text"))
    message = str(info.value)
    assert "'text'" in message
    assert "content" in message and "n" in message.split("columns:")[1]
    assert "data.text_field" in message


def test_non_text_column_is_rejected(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": 1}\n{"text": 2}\n')
    with pytest.raises(UsageError, match="not text"):
        load_documents(cfg_for("jsonl", [path]))


def test_empty_text_files_are_rejected(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n\t\n")
    with pytest.raises(UsageError, match="no non-empty documents"):
        load_documents(cfg_for("text-files", [tmp_path / "empty.txt"]))
    with pytest.raises(UsageError, match="no non-empty documents"):
        load_documents(cfg_for("text-files", [tmp_path / "empty.txt", tmp_path / "blank.txt"]))


def test_blank_documents_are_dropped(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ["real one", "", "   ", "real two"])
    docs = load_documents(cfg_for("jsonl", [path], eval_fraction=0.0))
    assert docs.train == ["real one", "real two"]


def test_empty_jsonl_file_is_a_usage_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UsageError):
        load_documents(cfg_for("jsonl", [tmp_path / "empty.jsonl"]))


def test_non_utf8_text_file_is_a_usage_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème\n".encode("latin-1"))
    with pytest.raises(UsageError) as info:
        load_documents(cfg_for("text-files", [path]))
    assert str(path) in str(info.value)


def test_non_utf8_text_file_message_mentions_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème\n".encode("latin-1"))
    with pytest.raises(UsageError) as info:
        load_documents(cfg_for("text-files", [path]))
    assert "UTF-8" in str(info.value)


def test_non_utf8_records_are_a_usage_error(tmp_path):
    from ptft.data.sources import load_records
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "caf\xe9", "response": "ok"}\n'.encode("latin-1"))
    with pytest.raises(UsageError, match="UTF-8") as info:
        load_records(cfg_for("jsonl", [path]))
    assert str(path) in str(info.value)


def test_malformed_jsonl_is_reported_once_with_its_row(tmp_path, capfd):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b\n')
    with pytest.raises(UsageError) as info:
        load_documents(cfg_for("jsonl", [path]))
    assert "row 1" in str(info.value) and "An error occurred" not in str(info.value)
    assert "Failed to load JSON" not in capfd.readouterr().err  # datasets' own log line


def test_describe_source_tracks_file_changes(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", sentences(3))
    cfg = cfg_for("jsonl", [path])
    first = describe_source(cfg)
    assert describe_source(cfg) == first  # stable: nothing changed
    load_documents(cfg)                   # reading does not change it either
    assert describe_source(cfg) == first
    write_jsonl(path, sentences(3) + ["one more document"])
    changed = describe_source(cfg)
    assert changed != first
    assert describe_source(cfg) == changed
    # Settings that change the documents change it too.
    assert describe_source(cfg_for("jsonl", [path], text_field="body")) != changed
    assert describe_source(cfg_for("jsonl", [path], eval_fraction=0.5)) != changed


# ---------------------------------------------------------------------------------- tokens


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(sentences(300) + ["héllo wörld, ∑ and 日本語 text"] * 3, 300)


def test_write_tokens_appends_eos_after_each_document(tokenizer, tmp_path):
    texts = ["the cat sat", "on a mat", "héllo ∑ 日本"]
    dtype = token_dtype(len(tokenizer))
    assert dtype == np.uint16
    count = write_tokens(texts, tokenizer, tmp_path / "t.bin", dtype)
    tokens = np.fromfile(tmp_path / "t.bin", dtype=dtype)
    assert count == len(tokens)
    eos = tokenizer.eos_token_id
    assert eos == tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    expected = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert eos not in ids
        expected += [*ids, eos]
    assert tokens.tolist() == expected
    assert int((tokens == eos).sum()) == len(texts)
    assert tokens[-1] == eos


def test_write_tokens_many_batches(tokenizer, tmp_path):
    texts = sentences(600)  # more than one tokenisation batch
    count = write_tokens(texts, tokenizer, tmp_path / "t.bin", np.dtype(np.uint16))
    tokens = np.fromfile(tmp_path / "t.bin", dtype=np.uint16)
    assert count == len(tokens)
    assert int((tokens == tokenizer.eos_token_id).sum()) == 600
    pieces = np.split(tokens, np.flatnonzero(tokens == tokenizer.eos_token_id)[:-1] + 1)
    assert tokenizer.decode(pieces[599][:-1].tolist()) == texts[599]


# ------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", ["héllo ∑ 日本", "the cat sat on a mat.", "  two  spaces\n\ttab\r\n",
                                  "hello , world . don 't", "emoji 🎉 and ünïcödé", "x",
                                  "def f(x):\n    return x ** 2  # code\n"])
def test_bpe_round_trips_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids and max(ids) < len(tokenizer)
    assert tokenizer.decode(ids) == text


def test_bpe_vocabulary_size_and_specials(tokenizer):
    assert 256 < len(tokenizer) <= 300
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    # BPE learnt merges: common words take fewer tokens than bytes.
    assert len(tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"]) < 22


def test_tokenizer_fingerprint(tokenizer, tmp_path):
    fp = tokenizer_fingerprint(tokenizer)
    assert fp == tokenizer_fingerprint(tokenizer)
    texts = sentences(300) + ["héllo wörld, ∑ and 日本語 text"] * 3
    assert tokenizer_fingerprint(train_bpe(texts, 300)) == fp  # training is deterministic
    tokenizer.save_pretrained(tmp_path)
    assert tokenizer_fingerprint(load_tokenizer(tmp_path)) == fp  # what the cache relies on
    assert tokenizer_fingerprint(train_bpe(texts, 280)) != fp


# --------------------------------------------------------------------------------- prepare


def _prepare_cfg(files: list[Path], cache: Path, *extra: str):
    paths = ",".join(f"'{p}'" for p in files)
    return to_object(compose("pretrain", ["data=text-files", f"data.paths=[{paths}]",
                                          "model.vocab_size=300", f"data.cache_dir='{cache}'",
                                          *extra]))


@pytest.fixture
def corpus_files(tmp_path) -> list[Path]:
    files = []
    for i in range(6):
        path = tmp_path / "data" / f"doc{i}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(" ".join(sentences(12, i * 100)), encoding="utf-8")
        files.append(path)
    return files


def _dot_entries(cache: Path) -> list[str]:
    return [str(p) for p in cache.rglob(".*")]


def test_prepare_builds_then_hits_the_cache(corpus_files, tmp_path):
    cache = tmp_path / "cache"
    cfg = _prepare_cfg(corpus_files, cache)
    assert cfg.data.paths == [str(p) for p in corpus_files]
    first = prepare_data(cfg)
    assert (first.tokenizer_cached, first.tokens_cached) == (False, False)
    assert first.meta['train_tokens'] > 0 and first.meta['eval_tokens'] > 0
    assert first.meta['documents'] == {"train": 5, "eval": 1}
    assert len(first.tokenizer) <= 300
    train_bin = first.tokens_dir / "train.bin"
    assert train_bin.stat().st_size == first.meta['train_tokens'] * np.dtype(first.meta['dtype']).itemsize
    assert (first.tokens_dir / "eval.bin").stat().st_size == first.meta['eval_tokens'] * np.dtype(first.meta['dtype']).itemsize
    tokens = np.fromfile(train_bin, dtype=np.dtype(first.meta['dtype']))
    assert int((tokens == first.tokenizer.eos_token_id).sum()) == 5
    assert _dot_entries(cache) == []

    second = prepare_data(_prepare_cfg(corpus_files, cache))
    assert (second.tokenizer_cached, second.tokens_cached) == (True, True)
    assert second.tokens_dir == first.tokens_dir
    assert (second.meta['train_tokens'], second.meta['eval_tokens']) == (first.meta['train_tokens'], first.meta['eval_tokens'])
    assert second.meta['documents'] == first.meta['documents']
    assert tokenizer_fingerprint(second.tokenizer) == tokenizer_fingerprint(first.tokenizer)
    assert _dot_entries(cache) == []


def test_changing_a_data_file_invalidates_the_token_cache(corpus_files, tmp_path):
    cache = tmp_path / "cache"
    first = prepare_data(_prepare_cfg(corpus_files, cache))
    corpus_files[0].write_text(" ".join(sentences(40, 5000)), encoding="utf-8")
    changed = prepare_data(_prepare_cfg(corpus_files, cache))
    assert changed.tokens_cached is False
    assert changed.tokens_dir != first.tokens_dir
    assert changed.meta['train_tokens'] + changed.meta['eval_tokens'] > first.meta['train_tokens'] + first.meta['eval_tokens']
    assert first.tokens_dir.is_dir()  # the old entry is left alone
    again = prepare_data(_prepare_cfg(corpus_files, cache))
    assert (again.tokenizer_cached, again.tokens_cached) == (True, True)
    assert again.tokens_dir == changed.tokens_dir
    assert _dot_entries(cache) == []


def test_failed_prepare_leaves_no_partial_cache(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n")
    cache = tmp_path / "cache"
    with pytest.raises(UsageError):
        prepare_data(_prepare_cfg([blank], cache))
    assert _dot_entries(cache) == []
    for sub in ("tokenizers", "tokens"):  # nothing that a later run could take for finished
        assert not (cache / sub).exists() or os.listdir(cache / sub) == []


def _model_dir(path: Path, tokenizer, **tokenizer_config) -> Path:
    """A model directory as prepare_data sees it (config.json + tokenizer), with fields of
    tokenizer_config.json overridden the way a user edits them."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    config_file = path / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **tokenizer_config}))
    return path


def test_changing_the_eos_token_invalidates_the_token_cache(tokenizer, corpus_files, tmp_path):
    # Same vocabulary and merges, only tokenizer_config.json's eos_token differs: the
    # backend definition is identical, but every document ends with a different token.
    before = _model_dir(tmp_path / "before", tokenizer)
    after = _model_dir(tmp_path / "after", tokenizer, eos_token="<|user|>")
    old, new = load_tokenizer(before), load_tokenizer(after)
    assert old.backend_tokenizer.to_str() == new.backend_tokenizer.to_str()
    assert old.eos_token_id != new.eos_token_id
    assert tokenizer_fingerprint(old) != tokenizer_fingerprint(new)

    cache = tmp_path / "cache"
    first = prepare_data(_prepare_cfg(corpus_files, cache, f"model.path='{before}'"))
    second = prepare_data(_prepare_cfg(corpus_files, cache, f"model.path='{after}'"))
    assert second.tokens_cached is False and second.tokens_dir != first.tokens_dir
    tokens = np.fromfile(second.tokens_dir / "train.bin", dtype=np.dtype(second.meta["dtype"]))
    assert int((tokens == new.eos_token_id).sum()) == second.meta["documents"]["train"]
    assert int((tokens == old.eos_token_id).sum()) == 0


def test_hub_source_reads_a_dataset_and_keys_its_revision(tmp_path, monkeypatch):
    """data=hub goes through datasets.load_dataset (here a local dataset folder, the hub
    being out of reach); the revision read is part of the cache key, so another revision
    (or the default branch at a new commit) is read and tokenised again."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(12)))
    pinned = DataConfig(source="hub", name=str(folder), revision="v2", eval_fraction=0.0)
    assert sorted(load_documents(pinned).train) == sorted(f"document {i}" for i in range(12))
    keys = {describe_source(DataConfig(source="hub", name=str(folder), revision=r))["revision"]
            for r in (None, "v2", "0" * 40)}
    assert keys == {None, "v2", "0" * 40}
