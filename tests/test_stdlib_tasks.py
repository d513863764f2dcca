"""Tests for the embedded stdlib-derived task datasets, run against the real stdlib."""
import ast
import re
import sysconfig
from collections import Counter
from pathlib import Path

import pytest

from ptft.config.schema import DataConfig
from ptft.data.sources import load_records
from ptft.data.split import held_out
from ptft.data.stdlib_tasks import (
    TASK_DATASETS,
    TOPIC_LABELS,
    iter_records,
    task_fingerprint,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PREFIX = "Summarise what this Python function does in one sentence.\n\n```python\n"


@pytest.fixture(scope="module")
def docstrings() -> list[dict]:
    # A full pass parses the whole stdlib (~2 s): do it once.
    return list(iter_records("docstrings"))


@pytest.fixture(scope="module")
def topics() -> list[dict]:
    return list(iter_records("stdlib-topics"))


def _code(record: dict) -> str:
    assert record["prompt"].startswith(PREFIX) and record["prompt"].endswith("\n```")
    return record["prompt"][len(PREFIX) : -len("\n```")]


def test_docstring_records_are_well_formed(docstrings):
    assert len(docstrings) > 1000
    ids = [r["id"] for r in docstrings]
    assert len(set(ids)) == len(ids)
    for r in docstrings:
        assert set(r) == {"id", "module", "prompt", "response"}
        code = _code(r)
        assert code.startswith(("def ", "async def ")), r["id"]
        ast.parse(code)  # valid code, not a broken fragment
        assert 2 <= len(code.splitlines()) and len(code) <= 1500
        assert 20 <= len(r["response"]) <= 300
        assert r["response"] == " ".join(r["response"].split())
        assert not r["id"].rsplit(":", 1)[1].split("#")[0].rsplit(".", 1)[-1].startswith("_")
    assert any(_code(r).startswith("async def ") for r in docstrings)


def test_known_function_has_docstring_removed(docstrings):
    record = next(r for r in docstrings if r["id"] == "json/__init__.py:dumps")
    assert record["module"] == "json"
    # Independently re-derive the expected response from the source file.
    tree = ast.parse((STDLIB / "json" / "__init__.py").read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "dumps")
    first_paragraph = re.split(r"\n\s*\n", ast.get_docstring(node))[0]
    assert record["response"] == " ".join(first_paragraph.split())
    assert record["response"].startswith("Serialize ``obj`` to a JSON formatted ``str``")
    assert _code(record).startswith("def dumps(obj, *, skipkeys=False")
    assert "Serialize" not in record["prompt"]
    assert '"""' not in _code(record)


def test_module_names_match_ids(docstrings, topics):
    for r in docstrings + topics:
        rel = r["id"].split(":", 1)[0]
        assert (STDLIB / rel).is_file()
        assert r["module"].split(".")[0] == rel.split("/")[0].removesuffix(".py")


def test_topic_records_cover_every_label(topics):
    assert TOPIC_LABELS == tuple(sorted(TOPIC_LABELS))
    for r in topics:
        assert set(r) == {"id", "module", "text", "label"}
        assert r["label"] in TOPIC_LABELS
        assert r["module"] == r["label"] or r["module"].startswith(r["label"] + ".")
        assert 60 <= len(r["text"]) <= 1000
        assert r["text"] == " ".join(r["text"].split())
    counts = Counter(r["label"] for r in topics)
    assert set(counts) == set(TOPIC_LABELS)
    assert min(counts.values()) >= 30, counts
    by_module = {r["module"]: r["label"] for r in topics}
    assert by_module["email.mime.text"] == "email"
    assert by_module["asyncio.tasks"] == "asyncio"


@pytest.mark.parametrize("name", TASK_DATASETS)
def test_split_is_by_module(name):
    records = load_records(DataConfig(source=name, eval_fraction=0.2))
    train_modules = {r["module"] for r in records.train}
    eval_modules = {r["module"] for r in records.eval}
    assert train_modules and eval_modules and not train_modules & eval_modules
    held = len(eval_modules) / len(train_modules | eval_modules)
    assert 0.05 <= held <= 0.35, held
    # Growing the fraction only moves modules into eval, never back.
    modules = sorted(train_modules | eval_modules)
    assert held_out(modules, 0.1) <= held_out(modules, 0.3)
    assert held_out(modules, 0.0) == set()


def test_order_is_deterministic(docstrings, topics):
    assert [r["id"] for r in iter_records("stdlib-topics")] == [r["id"] for r in topics]
    first = [r["id"] for r in iter_records("docstrings", max_records=300)]
    assert first == [r["id"] for r in iter_records("docstrings", max_records=300)]
    assert first == [r["id"] for r in docstrings[:300]]


def test_max_records_is_lazy_and_exact():
    it = iter_records("docstrings", max_records=7)
    assert not isinstance(it, list)
    assert len(list(it)) == 7
    assert len(list(iter_records("stdlib-topics", max_records=5))) == 5
    assert list(iter_records("docstrings", max_records=0)) == []
    with pytest.raises(ValueError):
        iter_records("docstrings", max_records=-1)


def test_unknown_name_raises_with_valid_names():
    with pytest.raises(ValueError, match="docstrings.*stdlib-topics"):
        iter_records("nope")
    with pytest.raises(ValueError, match="docstrings"):
        task_fingerprint("nope")


def test_fingerprint_is_stable_and_per_dataset():
    assert task_fingerprint("docstrings") == task_fingerprint("docstrings")
    assert task_fingerprint("docstrings") != task_fingerprint("stdlib-topics")
    assert re.fullmatch(r"[0-9a-f]{16}", task_fingerprint("stdlib-topics"))
