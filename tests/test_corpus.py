"""Tests for the embedded (stdlib-derived) corpora, run against the real stdlib."""
import sysconfig
from pathlib import Path

import pytest

from ptft.data.corpus import (
    EMBEDDED_CORPORA,
    Document,
    corpus_fingerprint,
    iter_documents,
    stdlib_python_files,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EXCLUDED_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@pytest.fixture(scope="module")
def docs_corpus() -> list[Document]:
    # The full python-docs pass parses the whole stdlib (~2 s): do it once.
    return list(iter_documents("python-docs"))


@pytest.fixture(scope="module")
def code_corpus() -> list[Document]:
    return list(iter_documents("python-code"))


def test_docs_start_with_topics_of_real_english(docs_corpus):
    topics = [d for d in docs_corpus if d.id.startswith("topic:")]
    assert len(topics) > 20
    assert docs_corpus[: len(topics)] == topics, "topics must come first"
    assert [d.id for d in topics] == sorted(d.id for d in topics)
    assert any("assert" in d.text for d in topics)
    assert any(" the " in d.text for d in topics)


def test_docs_contain_module_docstring_documents(docs_corpus):
    docstring_docs = [d for d in docs_corpus if not d.id.startswith("topic:")]
    assert len(docstring_docs) > 100
    json_docs = [d for d in docstring_docs if "json" in d.id]
    assert json_docs
    decoder = next(d for d in json_docs if d.id.endswith("json/decoder.py"))
    assert "json.decoder.JSONDecoder:" in decoder.text
    assert all(d.text.strip() for d in docs_corpus)


def test_max_documents_is_respected():
    it = iter_documents("python-code", max_documents=5)
    assert not isinstance(it, list)  # lazy iterator, not a materialised list
    assert len(list(it)) == 5
    assert len(list(iter_documents("python-docs", max_documents=5))) == 5
    assert list(iter_documents("python-code", max_documents=0)) == []


def test_order_is_deterministic(code_corpus):
    assert [d.id for d in iter_documents("python-code")] == [d.id for d in code_corpus]
    first = [d.id for d in iter_documents("python-docs", max_documents=150)]
    second = [d.id for d in iter_documents("python-docs", max_documents=150)]
    assert first == second
    assert len(set(first)) == len(first)


def test_code_documents_are_source_files(code_corpus):
    assert len(code_corpus) > 100
    assert all(d.id.startswith("stdlib:") for d in code_corpus)
    assert sum("def " in d.text for d in code_corpus) > len(code_corpus) // 2
    assert any(d.id == "stdlib:json/decoder.py" for d in code_corpus)


def test_no_tests_or_third_party_files(code_corpus, docs_corpus):
    files = stdlib_python_files()
    rel = [p.relative_to(STDLIB).as_posix() for p in files]
    assert rel == sorted(rel)
    for r in rel:
        parts = r.split("/")
        assert not EXCLUDED_PARTS & set(parts[:-1]), r
        assert not parts[-1].startswith("test_"), r
    ids = {d.id.split(":", 1)[1] for d in code_corpus + docs_corpus if not d.id.startswith("topic:")}
    assert ids <= set(rel)


def test_fingerprints_distinct_and_stable():
    a, b = (corpus_fingerprint(n) for n in EMBEDDED_CORPORA)
    assert a != b
    assert a == corpus_fingerprint(EMBEDDED_CORPORA[0])
    int(a, 16)  # hex


@pytest.mark.parametrize("call", [iter_documents, corpus_fingerprint])
def test_unknown_name_lists_valid_options(call):
    with pytest.raises(ValueError) as excinfo:
        call("no-such-corpus")
    for name in EMBEDDED_CORPORA:
        assert name in str(excinfo.value)


def test_the_corpus_key_follows_the_stdlib_files_present(tmp_path, monkeypatch):
    """A distribution package can add stdlib modules (Debian's python3-tk) without changing
    the interpreter's version: the cached corpus must not be reused then."""
    from ptft.data import corpus
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "__init__.py").write_text('"""JSON."""\n')
    monkeypatch.setattr(corpus, "_stdlib_root", lambda: tmp_path)
    corpus.stdlib_listing.cache_clear()
    before = corpus_fingerprint(EMBEDDED_CORPORA[0])
    (tmp_path / "tkinter.py").write_text('"""Tk."""\n')
    corpus.stdlib_listing.cache_clear()
    assert corpus_fingerprint(EMBEDDED_CORPORA[0]) != before
    corpus.stdlib_listing.cache_clear()
