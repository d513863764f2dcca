"""Compose the YAML config groups with command-line overrides, and validate the result.

Hydra does the composing (so its override grammar, `+key=`, `~key` and sweeps all work);
this module turns every way that can go wrong into one UsageError line that names the key and
suggests the closest valid name.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from importlib import resources
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ptft.config.schema import (DATA_SOURCES, FILE_SOURCES, METHOD_SCHEMAS, RANGES,
                               STAGE_SCHEMAS, TASK_SOURCES, RootConfig)
from ptft.errors import UsageError, did_you_mean, first_line

GROUPS = ("model", "data", "stage", "method")

ConfigStore.instance().store(name="ptft_schema", node=RootConfig)


def config_dir() -> Path:
    """The directory holding config.yaml and the group folders (top-level configs/)."""
    return Path(str(resources.files("ptft.configs")))


_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_./@+-]+")


def override(key: str, value: object) -> str:
    """`key=value` for a text value ptft passes on (a path, a name), quoted the Hydra way
    unless Hydra reads it back as that very text: 'a,b' would be a sweep, '(' a function call,
    '[' a list, '~' an error, and a folder named 10, true or null another type."""
    text = str(value)
    if _PLAIN_VALUE.fullmatch(text) and _parsed_value(f"{key}={text}") == text:
        return f"{key}={text}"
    # In a quoted value only quotes and the backslashes right before one are special.
    escaped = re.sub(r"(\\*)(')", lambda m: m.group(1) * 2 + "\\'", text)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"{key}='{escaped}'"


def _parsed_value(override_text: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(override_text).value()


def check_stage(stage: str) -> str:
    """`stage` if it names a stage option, else a UsageError with the closest one."""
    stages = group_options("stage")
    if stage not in stages:
        raise UsageError(f"unknown stage '{stage}'.{did_you_mean(stage, stages)} "
                         f"Stages: {', '.join(stages)}.")
    return stage


def group_options(group: str) -> list[str]:
    """The option names of a config group, e.g. ['llama-1b', 'llama-small', ...] for model."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def compose(stage: str, overrides: list[str]) -> DictConfig:
    """The composed config for `stage` with overrides applied, checked against the schema.

    `~key` resets a key to its schema default (a typed config has no missing keys).
    Raises UsageError for unknown keys or options, wrong types and malformed overrides.
    """
    hydra_overrides, resets = _split_resets(with_option_keys(stage, overrides))
    hydra_overrides.insert(0, f"stage={stage}")
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=hydra_overrides)
    except OverrideParseException as err:
        raise UsageError(f"malformed override: {first_line(err)}. Overrides look like "
                         "key=value, +key=value or ~key; quote values holding spaces or "
                         "brackets, e.g. 'data.paths=[a.txt,b.txt]'.") from None
    except (ConfigCompositionException, MissingConfigException, OmegaConfBaseException) as err:
        raise UsageError(explain(err, _options_only(stage, overrides))) from None
    validate(cfg)
    for key in resets:
        _reset_to_default(cfg, key)
    return cfg


def with_option_keys(stage: str, overrides: list[str]) -> list[str]:
    """`overrides`, with those that set a key of the chosen stage or method option that its
    YAML leaves out (method.use_dora, stage.train_on_prompt: documented, typed, defaulted in
    the option's schema) turned into Hydra's add-or-override `++key=value`. Hydra composes
    the open stage and method blocks from the YAML alone, so it would refuse them; the schema
    check in validate() still applies to what they set."""
    methods = [v for o in overrides if o.split("=")[0] == "method" for v in o.split("=", 1)[1]
               .split(",")] or [_default_option("method")]
    schemas = [STAGE_SCHEMAS.get(stage), *(METHOD_SCHEMAS.get(m) for m in methods)]
    keys = {f"{block}.{f.name}" for block, schema in zip(["stage"] + ["method"] * len(methods),
                                                         schemas)
            if schema is not None for f in dataclasses.fields(schema)}
    return [f"++{o}" if not o.startswith(("+", "~")) and o.split("=")[0] in keys else o
            for o in overrides]


@functools.cache
def _default_option(group: str) -> str:
    """The option config.yaml's defaults list picks for `group`."""
    import yaml

    defaults = yaml.safe_load((config_dir() / "config.yaml").read_text())["defaults"]
    return next(d[group] for d in defaults if isinstance(d, dict) and group in d)


def _split_resets(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Separate `~key` resets (applied by ptft after composing) from the overrides Hydra
    applies, keeping command-line order meaningful: the last mention of a key wins."""
    kept: list[str] = []
    resets: list[str] = []
    for override in overrides:
        key = override.lstrip("+~").split("=")[0]
        if override.startswith("~") and "=" not in override:
            if key in GROUPS:
                raise UsageError(f"'~{key}' would remove the {key} group, but every run needs "
                                 f"one; choose another option with {key}=<option> instead.")
            kept = [o for o in kept if o.lstrip("+").split("=")[0] != key]
            resets.append(key)
        else:
            resets = [r for r in resets if r != key]
            kept.append(override)
    return kept, resets


def _options_only(stage: str, overrides: list[str]) -> DictConfig | None:
    """The config with just the group choices of `overrides` (e.g. method=lora), so an error
    about a key can list the keys of the option the user chose."""
    choices = [o for o in overrides if o.split("=")[0] in GROUPS]
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=[f"stage={stage}", *choices])
    except Exception:  # the choices themselves are bad: explain() reports that instead
        return None


def validate(cfg: DictConfig) -> None:
    """Check the whole config against the schema (keys added with `+` included), the open
    blocks (stage, method) against their option's schema, and resolve every interpolation, so
    errors surface now rather than mid-run."""
    for block, schemas in (("stage", STAGE_SCHEMAS), ("method", METHOD_SCHEMAS)):
        name = cfg[block].get("name") if isinstance(cfg[block], DictConfig) else None
        if name not in schemas:
            raise UsageError(
                f"{block}.name={name!r} is not a known {block}."
                f"{did_you_mean(str(name), schemas)} Choose one of: {', '.join(sorted(schemas))}.")
    try:
        # Merge plain values, not cfg itself: keys added with `+` are only caught this way.
        checked = OmegaConf.merge(schema_tree(cfg), OmegaConf.to_container(cfg))
        OmegaConf.resolve(checked)
    except OmegaConfBaseException as err:
        raise UsageError(explain(err, cfg)) from None
    if cfg.data.source not in DATA_SOURCES:
        raise UsageError(f"data.source={cfg.data.source!r} is not a known source."
                         f"{did_you_mean(cfg.data.source, DATA_SOURCES)} "
                         f"Choose one of: {', '.join(DATA_SOURCES)}.")
    _check_stage_data(cfg)
    _check_ranges(checked)
    with _unlocked(cfg):
        for key in checked:
            cfg[key] = checked[key]


def _check_ranges(cfg: DictConfig) -> None:
    """Numbers inside the values they may take (schema.RANGES): a zero batch or cadence
    would otherwise fail mid-run with a division by zero, a negative one run silently."""
    for key, (low, high) in RANGES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # null, or a key this option does not have
        if (low is not None and value < low) or (high is not None and value > high):
            if high is None:
                bound = f"at least {low:g}" if low >= 1 or low == 0 else "above 0"
            else:
                bound = f"between {low:g} and {high:g}"
            raise UsageError(f"{key}={value} is out of range: it must be {bound}.")


def _check_stage_data(cfg: DictConfig) -> None:
    """Pre-training reads running text; fine-tuning reads task records; evaluation files go
    with training files."""
    source, stage = cfg.data.source, cfg.stage.name
    if stage == "pretrain" and source in TASK_SOURCES:
        raise UsageError(f"data={source} is fine-tuning data; run `ptft finetune data={source}`, "
                         "or pre-train on running text (data=python-docs, python-code, files).")
    if stage == "finetune" and source in ("python-docs", "python-code", "text-files"):
        raise UsageError(f"data={source} is running text, not fine-tuning records; use "
                         "data=docstrings (SFT), data=stdlib-topics (classification) or your "
                         "own records with data=jsonl/csv/parquet.")
    if cfg.data.eval_paths and source not in FILE_SOURCES:
        # Read with this source's reader, the files would be ignored (embedded corpora) or
        # stand in for a second copy of the training data (hub): evaluation on training data.
        raise UsageError(f"data.eval_paths names files, but data={source} is not read from "
                         "files: its evaluation set is held out by data.eval_fraction. Drop "
                         "data.eval_paths, or train on files too (data=text-files, jsonl, csv "
                         "or parquet with data.paths=[...]).")


def schema_tree(cfg: DictConfig | None) -> DictConfig:
    """The root schema with the stage and method blocks typed by the options chosen in cfg."""
    tree = OmegaConf.structured(RootConfig)
    if cfg is not None:
        tree.stage = OmegaConf.structured(STAGE_SCHEMAS[cfg.stage.name])
        tree.method = OmegaConf.structured(METHOD_SCHEMAS[cfg.method.name])
    return tree


def to_object(cfg: DictConfig) -> RootConfig:
    """The validated config as dataclass instances (RootConfig with typed stage and method)."""
    return OmegaConf.to_object(OmegaConf.merge(schema_tree(cfg), cfg))


def _reset_to_default(cfg: DictConfig, key: str) -> None:
    *parents, leaf = key.split(".")
    node = schema_tree(cfg)
    for part in [*parents, leaf]:
        if not isinstance(node, DictConfig) or part not in node:
            raise UsageError(_unknown_key_message(key, cfg))
        node = node[part]
    with _unlocked(cfg):
        OmegaConf.update(cfg, key, node, merge=False)


class _unlocked:
    """Lift Hydra's struct flag for writes that the schema has already checked."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def __enter__(self):
        OmegaConf.set_struct(self.cfg, False)

    def __exit__(self, *exc):
        OmegaConf.set_struct(self.cfg, True)


def explain(err: Exception, cfg: DictConfig | None) -> str:
    """Turn a Hydra/OmegaConf exception into one line naming the key and a likely fix."""
    text = str(err)
    cause = err.__cause__ or err.__context__
    # model=nope -> Hydra: "Could not find 'model/nope'"
    missing = re.search(r"Could not find '(\w+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = group_options(group)
        return (f"unknown {group} option '{option}'.{did_you_mean(option, options)} "
                f"Available: {', '.join(options)}.")
    key = _failing_key(err) or (_failing_key(cause) if cause else None)
    if key is None:
        return first_line(err)
    unknown = any(marker in f"{text} {cause}" for marker in
                  ("not in struct", "Could not override", "not in '", "does not exist"))
    if unknown:
        return _unknown_key_message(key, cfg)
    # OmegaConf keeps the filled-in message in .msg; str() of a chained copy can still show
    # its template ("Value '$VALUE' is not a valid bool").
    detail = next((m for m in (getattr(e, "msg", None) for e in (err, cause))
                   if isinstance(m, str) and "$" not in m), None)
    return f"invalid value for '{key}': {first_line(detail or cause or err)}"


def _failing_key(err: BaseException) -> str | None:
    text = str(err)
    found = (re.search(r"Could not (?:override|append to config|delete from config)\.? '([^']+)'",
                       text)
             or re.search(r"Key '([^']+)' not in '", text) and None
             or re.search(r"full_key: ([\w.\[\]-]+)", text))
    if found:
        return found.group(1)
    full_key = getattr(err, "full_key", None)
    return full_key or None


def _unknown_key_message(key: str, cfg: DictConfig | None) -> str:
    """'unknown key' naming the first path segment the schema lacks, with a suggestion."""
    node: Any = schema_tree(cfg)
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            break
        if part not in node:
            parent = ".".join(parts[:depth])
            known = [str(k) for k in node.keys()]
            where = f"'{parent}'" if parent else "the top level"
            return (f"unknown key '{key}'.{did_you_mean(part, known)} Valid keys in {where}: "
                    f"{', '.join(sorted(known))}. (`ptft config` prints the whole config.)")
        node = node[part]
    return f"'{key}' cannot be set or removed here."


