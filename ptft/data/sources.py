"""Documents for training and evaluation, from every kind of data source.

`describe_source` fingerprints the data cheaply (no reading), so a warm cache can skip
`load_documents` altogether. Local files are read through `datasets`, which handles the
formats; every failure a user can cause becomes a UsageError naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ptft.config.schema import DataConfig
from ptft.data import corpus, split, stdlib_tasks
from ptft.errors import UsageError, caused_by, first_line

# Bump when the way documents are read or split changes, so caches built before are not reused.
SOURCES_FORMAT_VERSION = 1

# The `datasets` builder for each file source.
_BUILDERS = {"text-files": "text", "jsonl": "json", "parquet": "parquet", "csv": "csv"}


@dataclass
class Documents:
    train: list[str]
    eval: list[str]


@dataclass
class Records:
    train: list[dict]
    eval: list[dict]


def expand_paths(patterns: list[str], key: str) -> list[Path]:
    """Files named by `patterns` (globs allowed), sorted; UsageError for any that match nothing."""
    if not patterns:
        raise UsageError(f"{key} is empty: name the files to read, e.g. {key}=[corpus.jsonl].")
    files: list[Path] = []
    for pattern in patterns:
        matched = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if not matched:
            raise UsageError(f"{key}: no file matches '{pattern}'. Check the path (relative "
                             "paths start from the directory you run ptft in).")
        files += [Path(m).resolve() for m in matched if Path(m).is_file()]
    return files


def describe_source(cfg: DataConfig) -> dict:
    """Everything about the data that changes the documents, without reading them."""
    description: dict = {"format": SOURCES_FORMAT_VERSION, "source": cfg.source,
                         "max_documents": cfg.max_documents, "eval_fraction": cfg.eval_fraction}
    if cfg.source in corpus.EMBEDDED_CORPORA:
        description["corpus"] = corpus.corpus_fingerprint(cfg.source)
    elif cfg.source in stdlib_tasks.TASK_DATASETS:
        description["corpus"] = stdlib_tasks.task_fingerprint(cfg.source)
    elif cfg.source == "hub":
        description.update(name=cfg.name, subset=cfg.subset, split=cfg.split,
                           revision=hub_revision(cfg))
    else:
        description["files"] = [_file_stamp(p) for p in expand_paths(cfg.paths, "data.paths")]
    if cfg.source in _BUILDERS or cfg.source == "hub":
        description["fields"] = [cfg.text_field, cfg.prompt_field, cfg.response_field,
                                 cfg.messages_field, cfg.label_field]
    if cfg.eval_paths:
        description["eval_files"] = [_file_stamp(p)
                                     for p in expand_paths(cfg.eval_paths, "data.eval_paths")]
    return description


def fingerprint(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def load_documents(cfg: DataConfig) -> Documents:
    """Read the documents and split them into train and eval."""
    texts, ids = _read(cfg, cfg.paths, "data.paths")
    if cfg.eval_paths:
        eval_texts, _ = _read(cfg, cfg.eval_paths, "data.eval_paths")
        return Documents(train=texts, eval=eval_texts)
    held_out = split.held_out(ids, cfg.eval_fraction)
    return Documents(train=[t for i, t in zip(ids, texts) if i not in held_out],
                     eval=[t for i, t in zip(ids, texts) if i in held_out])


def _read(cfg: DataConfig, patterns: list[str], key: str) -> tuple[list[str], list[str]]:
    """(texts, stable ids) of the non-empty documents of a source."""
    if cfg.source in corpus.EMBEDDED_CORPORA:
        docs = list(corpus.iter_documents(cfg.source, cfg.max_documents))
        pairs = [(d.text, d.id) for d in docs]
    elif cfg.source == "hub":
        pairs = _texts_of(_read_hub(cfg), cfg.text_field, f"hub:{cfg.name}", cfg.max_documents)
    else:
        pairs = _read_files(cfg, expand_paths(patterns, key))
    pairs = [(text, doc_id) for text, doc_id in pairs if text.strip()]
    if not pairs:
        where = ", ".join(patterns) if patterns else cfg.source
        raise UsageError(f"the data source ({where}) holds no non-empty documents; "
                         "point data.paths at files with text in them.")
    return [t for t, _ in pairs], [i for _, i in pairs]


def _read_files(cfg: DataConfig, files: list[Path]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    field = "text" if cfg.source == "text-files" else cfg.text_field
    for table, origin in _tables(cfg, files):
        pairs += _texts_of(table, field, origin, cfg.max_documents and cfg.max_documents - len(pairs))
        if cfg.max_documents and len(pairs) >= cfg.max_documents:
            break
    return pairs


def _tables(cfg: DataConfig, files: list[Path]):
    """(datasets.Dataset, origin) for each file, or the one hub dataset, read lazily."""
    if cfg.source == "hub":
        yield _read_hub(cfg), f"hub:{cfg.name}"
        return
    import datasets

    datasets.disable_progress_bars()
    for path in files:
        kwargs = {"sample_by": "document"} if cfg.source == "text-files" else {}
        try:
            with _quiet_datasets():
                table = datasets.load_dataset(_BUILDERS[cfg.source], data_files=str(path),
                                              split="train", **kwargs)
        except Exception as err:  # datasets wraps parser errors in many types
            decode = caused_by(err, UnicodeDecodeError)
            if decode is not None:
                raise _not_utf8(str(path), decode) from None
            if path.stat().st_size == 0:
                raise UsageError(f"{path} is empty; point data.paths at files with data.") from None
            raise UsageError(f"could not read {path} as {cfg.source}: {_reason(err)}") from None
        yield table, str(path)


@contextlib.contextmanager
def _decoding(origin: str):
    """Arrow's JSON reader keeps strings as bytes without checking them: text that is not
    UTF-8 only fails when the rows are turned into Python strings, after loading."""
    try:
        yield
    except UnicodeDecodeError as decode:
        raise _not_utf8(origin, decode) from None


def _not_utf8(origin: str, decode: UnicodeDecodeError) -> UsageError:
    return UsageError(f"{origin} is not valid UTF-8 text ({decode.reason}); convert it to "
                      "UTF-8, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8.")


def _reason(err: BaseException) -> str:
    """What the parser said: `datasets` wraps it in a DatasetGenerationError ('An error
    occurred while generating the dataset') that names neither the problem nor the row."""
    while type(err).__name__ == "DatasetGenerationError" and (err.__cause__ or err.__context__):
        err = err.__cause__ or err.__context__
    return first_line(err)


@contextlib.contextmanager
def _quiet_datasets():
    """`datasets` logs a parser failure as an error line of its own before raising; ptft
    reports it once, in its own message."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)


def hub_revision(cfg: DataConfig) -> str | None:
    """The revision of the hub dataset to read: data.revision as the commit it names now when
    the hub can say (a branch moves; a commit read once is read the same way again), else
    data.revision as given. The same answer for the whole process: the cache key and the
    documents read come from one commit."""
    from ptft.hub import prepare_for_hub

    key = (cfg.name, cfg.revision)
    if key not in _RESOLVED:
        commit = None
        if cfg.name and prepare_for_hub():
            try:
                from huggingface_hub import HfApi
                commit = HfApi().dataset_info(cfg.name, revision=cfg.revision, timeout=10).sha
            except Exception:  # reported by load_dataset, which says what is wrong
                commit = None
        _RESOLVED[key] = commit or cfg.revision
    return _RESOLVED[key]


_RESOLVED: dict[tuple, str | None] = {}


def _read_hub(cfg: DataConfig):
    from ptft.hub import offline_hint, prepare_for_hub

    if not cfg.name:
        raise UsageError("data=hub needs a dataset name: data.name=<owner/dataset>.")
    online = prepare_for_hub()
    import datasets

    try:
        return datasets.load_dataset(cfg.name, cfg.subset, split=cfg.split,
                                     revision=hub_revision(cfg))
    except Exception as err:  # connection, missing dataset and bad split all land here
        reason = offline_hint() if not online else first_line(err)
        raise UsageError(f"could not load hub dataset data.name={cfg.name}: {reason} Use local "
                         "files instead: data=jsonl data.paths=[your.jsonl].") from None


def load_records(cfg: DataConfig) -> Records:
    """Fine-tuning records (dicts), split into train and eval. Each carries `_origin`
    ('file row N') so a bad record can be reported precisely."""
    if cfg.source in stdlib_tasks.TASK_DATASETS:
        records = [{**r, "_origin": f"{cfg.source} {r['id']}"}
                   for r in stdlib_tasks.iter_records(cfg.source, cfg.max_documents)]
        # Split by module: evaluation is on modules never seen in training.
        modules = split.held_out((r["module"] for r in records), cfg.eval_fraction)
        return Records(train=[r for r in records if r["module"] not in modules],
                       eval=[r for r in records if r["module"] in modules])
    records = _records_of(cfg, cfg.paths, "data.paths")
    if cfg.eval_paths:
        return Records(train=records, eval=_records_of(cfg, cfg.eval_paths, "data.eval_paths"))
    held_out = split.held_out([r["_origin"] for r in records], cfg.eval_fraction)
    return Records(train=[r for r in records if r["_origin"] not in held_out],
                   eval=[r for r in records if r["_origin"] in held_out])


def _records_of(cfg: DataConfig, patterns: list[str], key: str) -> list[dict]:
    if cfg.source not in _BUILDERS and cfg.source != "hub":
        raise UsageError(f"data.source={cfg.source} holds running text, not fine-tuning records; "
                         "use data=docstrings, data=stdlib-topics, or your own "
                         "jsonl/csv/parquet records.")
    files = [] if cfg.source == "hub" else expand_paths(patterns, key)
    records: list[dict] = []
    for table, origin in _tables(cfg, files):
        if cfg.max_documents:
            table = table.select(range(min(cfg.max_documents - len(records), len(table))))
        with _decoding(origin):
            rows = table.to_list()
        records += [{**row, "_origin": f"{origin} row {i}"} for i, row in enumerate(rows)]
        if cfg.max_documents and len(records) >= cfg.max_documents:
            break
    if not records:
        raise UsageError(f"{key} ({', '.join(patterns) or cfg.source}) holds no records.")
    return records


def _texts_of(table, field: str, origin: str, limit: int | None) -> list[tuple[str, str]]:
    if field not in table.column_names:
        raise UsageError(f"{origin} has no column '{field}' (columns: "
                         f"{', '.join(table.column_names)}); set data.text_field=<column>.")
    pairs = []
    with _decoding(origin):  # older datasets decode the whole column here, newer ones per row
        column = table[field] if not limit else table.select(range(min(limit, len(table))))[field]
        for row, text in enumerate(column):
            if text is not None and not isinstance(text, str):
                raise UsageError(f"{origin} row {row}: column '{field}' holds "
                                 f"{type(text).__name__}, not text; choose a text column.")
            pairs.append((text or "", f"{origin}#{row}"))
    return pairs


def _file_stamp(path: Path) -> list:
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]
