"""Embedded training corpora that ship with Python itself.

Why: ptft must work offline, on any machine, with no download step. Every
Python installation already carries a sizeable amount of real text:

* ``python-docs`` -- English prose: the interpreter's own reference
  documentation (``pydoc_data.topics``) followed by the docstrings of the
  standard library, one document per module.
* ``python-code`` -- the standard library's source, one document per file.

Docstrings are extracted with ``ast`` instead of importing modules, because
importing arbitrary stdlib modules is slow, can have side effects (GUI
toolkits, platform-only modules) and can fail outright on some platforms.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import itertools
import logging
import os
import sys
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

# Bump whenever extraction logic changes, so cached tokenized data is rebuilt.
CORPUS_FORMAT_VERSION = 1

EMBEDDED_CORPORA = ("python-docs", "python-code")

# Short docstrings ("Return self.") are boilerplate and teach little.
MIN_DOCSTRING_CHARS = 40

# Pruned anywhere in the tree: third-party code and test suites are not "the
# stdlib" and vary between installations (distros often strip tests).
_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


@dataclass(frozen=True)
class Document:
    id: str  # stable across runs and machines, e.g. "topic:assert", "stdlib:json/decoder.py"
    text: str


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _check_name(name: str) -> None:
    if name not in EMBEDDED_CORPORA:
        raise ValueError(
            f"unknown embedded corpus {name!r}; valid names: {', '.join(EMBEDDED_CORPORA)}"
        )


def stdlib_python_files() -> list[Path]:
    """The sorted list of stdlib source files used by the embedded corpora."""
    root = _stdlib_root()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for fname in filenames:
            if fname.endswith(".py") and not fname.startswith("test_"):
                path = Path(dirpath, fname)
                found.append((path.relative_to(root).as_posix(), path))
    # Sort on the posix relative path so the order is identical on every OS.
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def _read_source(path: Path) -> str:
    # Honour PEP 263 coding cookies; one odd file must never break the corpus.
    try:
        with tokenize.open(path) as fh:
            return fh.read()
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return path.read_text(encoding="utf-8", errors="replace")


def _module_name(rel: str) -> str:
    name = rel[: -len(".py")].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _docstring_entries(tree: ast.Module, modname: str) -> Iterator[str]:
    def entry(node: ast.AST, qualname: str) -> Iterator[str]:
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc and len(doc) >= MIN_DOCSTRING_CHARS:
            yield f"{qualname}:\n{doc}"

    def walk(node: ast.AST, prefix: str) -> Iterator[str]:
        # Recurse through every statement so definitions nested in if/try
        # blocks (platform-specific variants) are found too.
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = f"{prefix}.{child.name}"
                yield from entry(child, qualname)
                yield from walk(child, qualname)
            else:
                yield from walk(child, prefix)

    yield from entry(tree, modname)
    yield from walk(tree, modname)


def _topic_documents() -> Iterator[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distros package pydoc_data separately
        log.warning("pydoc_data not available; python-docs has docstrings only")
        return
    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            yield Document(id=f"topic:{key}", text=text)


def _docstring_documents() -> Iterator[Document]:
    root = _stdlib_root()
    unparsable = 0
    for path in stdlib_python_files():
        rel = path.relative_to(root).as_posix()
        try:
            tree = ast.parse(_read_source(path), filename=str(path))
        except (SyntaxError, ValueError):  # ValueError: null bytes in source
            unparsable += 1
            continue
        entries = list(_docstring_entries(tree, _module_name(rel)))
        if entries:
            yield Document(id=f"docstring:{rel}", text="\n\n".join(entries))
    log.debug("python-docs: skipped %d stdlib files that failed to parse", unparsable)


def _code_documents() -> Iterator[Document]:
    root = _stdlib_root()
    for path in stdlib_python_files():
        text = _read_source(path)
        if text.strip():  # many __init__.py files are empty
            yield Document(id=f"stdlib:{path.relative_to(root).as_posix()}", text=text)


def iter_documents(name: str, max_documents: int | None = None) -> Iterator[Document]:
    """Yield the documents of an embedded corpus in a deterministic order, lazily.

    Stops as soon as ``max_documents`` have been yielded, without reading or
    parsing the rest of the standard library.
    """
    _check_name(name)
    if max_documents is not None and max_documents < 0:
        raise ValueError(f"max_documents must be >= 0, got {max_documents}")
    return _limited(name, max_documents)


def _limited(name: str, max_documents: int | None) -> Iterator[Document]:
    # Separate generator so a bad name raises at call time, not at first next().
    if max_documents == 0:
        return
    if name == "python-docs":
        source = itertools.chain(_topic_documents(), _docstring_documents())
    else:
        source = _code_documents()
    for count, doc in enumerate(source, start=1):
        yield doc
        if max_documents is not None and count >= max_documents:
            return


def corpus_fingerprint(name: str) -> str:
    """A short hex string that changes whenever the corpus contents would.

    Cheap on purpose (the files are listed, not read): the interpreter version and
    location, and which stdlib files there are with their sizes, since distributions
    add modules to the same interpreter (Debian's python3-tk, python3-lib2to3) without
    changing its version. Extraction logic is covered by CORPUS_FORMAT_VERSION.
    """
    _check_name(name)
    key = "\0".join([str(CORPUS_FORMAT_VERSION), name, sys.version, str(_stdlib_root()),
                     stdlib_listing()])
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


@functools.cache
def stdlib_listing() -> str:
    """A hash of the stdlib files the corpora read: their relative paths and sizes."""
    root = _stdlib_root()
    entries = [f"{path.relative_to(root).as_posix()}:{path.stat().st_size}"
               for path in stdlib_python_files()]
    return hashlib.sha256("\n".join(entries).encode("utf-8")).hexdigest()[:16]
