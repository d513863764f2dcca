"""Embedded fine-tuning task datasets derived from the Python standard library.

Why: like the pre-training corpora in :mod:`ptft.data.corpus`, fine-tuning data
must work offline on every machine with no download. The stdlib already pairs
real code with real, human-written English, so two tasks come for free:

* ``docstrings`` (instruction tuning): show a function's source with its
  docstring removed, ask for a one-sentence summary; the target is the first
  paragraph of the docstring that was removed.
* ``stdlib-topics`` (classification): a docstring labelled with the top-level
  stdlib package it comes from (``email/mime/text.py`` -> ``email``).

Everything is extracted with ``ast`` (never by importing modules, which is slow,
has side effects and fails on some platforms). Records carry their dotted
module name so that ptft.data.split can split train/eval *by module*:
functions of one module share helpers, names and phrasing, so a random
per-record split would leak; evaluation is instead on unseen modules.
"""
from __future__ import annotations

import ast
import hashlib
import re
import sys
import textwrap
from typing import Iterator

from ptft.data.corpus import (_module_name, _read_source, _stdlib_root, stdlib_listing,
                              stdlib_python_files)

# Bump whenever extraction logic changes, so cached tokenized data is rebuilt.
TASKS_FORMAT_VERSION = 1

TASK_DATASETS = ("docstrings", "stdlib-topics")

# Chosen by docstring count (CPython 3.11) among packages present in every
# CPython 3.10+ build. Avoided: build-optional or removed packages (tkinter,
# idlelib, lib2to3, distutils, turtledemo, ensurepip), single-file modules
# (a module-level split would put the whole label on one side) and encodings
# (near-identical generated codec docstrings).
TOPIC_LABELS: tuple[str, ...] = (
    "asyncio", "email", "http", "importlib", "logging",
    "multiprocessing", "unittest", "urllib", "xml", "xmlrpc",
)

PROMPT_TEMPLATE = (
    "Summarise what this Python function does in one sentence.\n\n```python\n{source}\n```"
)

# Bounds keep targets to summary-sized sentences and prompts to a size a
# small model's context can hold.
MIN_RESPONSE_CHARS = 20
MAX_RESPONSE_CHARS = 300
MAX_SOURCE_CHARS = 1500
MIN_SOURCE_LINES = 2
MIN_TOPIC_CHARS = 60
MAX_TOPIC_CHARS = 1000

_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)


def _check_name(name: str) -> None:
    if name not in TASK_DATASETS:
        raise ValueError(
            f"unknown task dataset {name!r}; valid names: {', '.join(TASK_DATASETS)}"
        )


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _top_level(rel: str) -> str:
    return rel.split("/", 1)[0].removesuffix(".py")


def _definitions(tree: ast.Module) -> Iterator[tuple[str, ast.AST]]:
    """(qualname, node) for every class and function, in source order."""
    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.AST]]:
        # Recurse through every statement so definitions nested in if/try
        # blocks (platform-specific variants) are found too.
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, *_FUNCS)):
                qualname = f"{prefix}{child.name}"
                yield qualname, child
                yield from walk(child, qualname + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def _source_without_docstring(lines: list[str], node: ast.AST) -> str | None:
    """The function's dedented source minus its docstring lines, or None if unusable.

    Equivalent to ``ast.get_source_segment(source, node, padded=True)`` on
    pre-split lines: that helper re-splits the whole file on every call, which
    made a full pass quadratic in file size (~22 s instead of ~2 s).
    """
    doc = node.body[0]  # type: ignore[attr-defined]
    first, last = node.lineno - 1, node.end_lineno - 1  # type: ignore[attr-defined]
    # A docstring on the ``def`` line cannot be cut out by whole lines.
    if doc.lineno == node.lineno:  # type: ignore[attr-defined]
        return None
    # ``def`` always starts a logical line, so whole lines from ``first`` are
    # exactly the padded segment; end_col_offset is in UTF-8 bytes.
    end = lines[last].encode("utf-8")[: node.end_col_offset].decode("utf-8")  # type: ignore[attr-defined]
    segment = lines[first:last] + [end]
    start, stop = doc.lineno - 1 - first, doc.end_lineno - first
    rest = segment[stop:]
    if not any(line.strip() for line in rest):
        # e.g. ``"""doc"""; return x`` lost its code with the docstring line:
        # keep the function syntactically plausible.
        indent = segment[start][: len(segment[start]) - len(segment[start].lstrip())]
        rest = [indent + "..."]
    # Cut the docstring before dedenting: docstrings written at column 0
    # (os.spawnv) would otherwise block dedent.
    code = textwrap.dedent("\n".join(segment[:start] + rest)).rstrip()
    # Multi-line string literals at column 0 still block dedent (pydoc's HTML
    # templates); an indented ``def`` would not parse, so drop those few.
    return None if code[:1].isspace() else code


def _docstring_records(source: str, tree: ast.Module, rel: str, module: str) -> Iterator[dict]:
    lines = source.split("\n")  # _read_source uses universal newlines, as ast does
    for qualname, node in _definitions(tree):
        name = qualname.rsplit(".", 1)[-1]
        # len(body) == 1: docstring-only bodies (abstract stubs) have no code to summarise.
        if not isinstance(node, _FUNCS) or name.startswith("_") or len(node.body) < 2:
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc:
            continue
        response = _normalise(re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0])
        if not MIN_RESPONSE_CHARS <= len(response) <= MAX_RESPONSE_CHARS:
            continue
        code = _source_without_docstring(lines, node)
        if code is None or len(code) > MAX_SOURCE_CHARS or code.count("\n") + 1 < MIN_SOURCE_LINES:
            continue
        yield {
            "id": f"{rel}:{qualname}",
            "module": module,
            "prompt": PROMPT_TEMPLATE.format(source=code),
            "response": response,
        }


def _topic_records(source: str, tree: ast.Module, rel: str, module: str) -> Iterator[dict]:
    label = _top_level(rel)
    if label not in TOPIC_LABELS:
        return
    for qualname, node in [("<module>", tree), *_definitions(tree)]:
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        text = _normalise(doc or "")
        if len(text) >= MIN_TOPIC_CHARS:
            yield {"id": f"{rel}:{qualname}", "module": module,
                   "text": text[:MAX_TOPIC_CHARS].rstrip(), "label": label}


def _records(name: str) -> Iterator[dict]:
    extract = _docstring_records if name == "docstrings" else _topic_records
    root = _stdlib_root()
    for path in stdlib_python_files():
        rel = path.relative_to(root).as_posix()
        # Cheap pre-filter: don't read or parse files that cannot yield a topic.
        if name == "stdlib-topics" and _top_level(rel) not in TOPIC_LABELS:
            continue
        source = _read_source(path)
        try:
            tree = ast.parse(source, filename=str(path))
        except (SyntaxError, ValueError):  # ValueError: null bytes in source
            continue
        seen: dict[str, int] = {}
        for record in extract(source, tree, rel, _module_name(rel)):
            # Platform variants (``if sys.platform...: def f``) share a qualname;
            # ids must stay unique, so later copies get a numeric suffix.
            n = seen[record["id"]] = seen.get(record["id"], 0) + 1
            if n > 1:
                record["id"] += f"#{n}"
            yield record


def iter_records(name: str, max_records: int | None = None) -> Iterator[dict]:
    """Yield the records of a task dataset in a deterministic order, lazily.

    Files are visited in sorted path order, and parsing stops as soon as
    ``max_records`` records have been yielded.
    """
    _check_name(name)
    if max_records is not None and max_records < 0:
        raise ValueError(f"max_records must be >= 0, got {max_records}")
    return _limited(name, max_records)


def _limited(name: str, max_records: int | None) -> Iterator[dict]:
    # Separate generator so a bad name raises at call time, not at first next().
    if max_records == 0:
        return
    for count, record in enumerate(_records(name), start=1):
        yield record
        if max_records is not None and count >= max_records:
            return


def task_fingerprint(name: str) -> str:
    """A short hex string that changes whenever the dataset contents would.

    Cheap on purpose (files listed, not read), like ``corpus_fingerprint``;
    extraction logic is covered by TASKS_FORMAT_VERSION.
    """
    _check_name(name)
    key = "\0".join(["tasks", str(TASKS_FORMAT_VERSION), name, sys.version, str(_stdlib_root()),
                     stdlib_listing()])
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
