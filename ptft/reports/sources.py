"""`ptft config --sources`: every key of the composed config with the place its value came from.

Hydra composes, in this order (a later layer wins): the typed schema (ptft/config/schema.py),
the group options of the defaults list in configs/config.yaml (model, data, stage, method: one
file each, e.g. configs/model/llama-tiny.yaml), the primary configs/config.yaml itself, then the
command line. This module replays those layers on the keys each one sets.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ptft.config.compose import GROUPS, compose, config_dir, with_option_keys

SCHEMA = "schema default"
COMMAND_LINE = "command line"


def config_sources(stage: str, overrides: list[str]) -> list[tuple[str, object, str]]:
    """(key, value, source) for every leaf of the composed config, in config order."""
    cfg = compose(stage, overrides)  # validates: a bad override is a UsageError here
    values = _flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    sources = {key: SCHEMA for key in values}
    for label, tree in _layers(stage, overrides):
        for key in _flatten(tree):
            _assign(sources, key, label)
    for override in overrides:  # command-line order: the last mention wins
        key = override.lstrip("+~").split("=")[0]
        if key in GROUPS or key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue  # a group choice: its file is the source of the keys it sets
        reset = override.startswith("~") and "=" not in override
        _assign(sources, key, f"{COMMAND_LINE}: ~{key} (schema default)" if reset
                else f"{COMMAND_LINE}: {override}")
    return [(key, value, sources[key]) for key, value in values.items()]


def print_sources(stage: str, overrides: list[str], console: Console | None = None) -> None:
    rows = config_sources(stage, overrides)
    table = Table(box=None, header_style="bold", pad_edge=False,
                  title=f"ptft config {stage}: each value and where it came from "
                        "(later layers win: schema < configs/<group>/<option>.yaml < "
                        "configs/config.yaml < command line)", title_justify="left")
    table.add_column("key", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("source", overflow="fold")
    for key, value, source in rows:
        style = ("dim" if source == SCHEMA else "bold yellow" if source.startswith(COMMAND_LINE)
                 else "green")
        table.add_row(key, escape(_render(value)), f"[{style}]{escape(source)}[/]")
    (console or Console()).print(table)


def _layers(stage: str, overrides: list[str]) -> list[tuple[str, dict]]:
    """(label, keys it sets) for each config file Hydra composes, in composition order."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    root = config_dir()
    hydra_overrides = [f"stage={stage}"] + [o for o in with_option_keys(stage, overrides)
                                            if not (o.startswith("~") and "=" not in o)]
    with initialize_config_dir(config_dir=str(root), version_base="1.3"):
        choices = hydra_compose(config_name="config", overrides=hydra_overrides,
                                return_hydra_config=True).hydra.runtime.choices
    primary = yaml.safe_load((root / "config.yaml").read_text()) or {}
    layers = []
    for entry in primary.get("defaults", []):
        if not isinstance(entry, dict):
            continue  # ptft_schema, _self_
        (group, _), = entry.items()
        option = choices.get(group)
        if group not in GROUPS or option is None:
            continue
        path = root / group / f"{option}.yaml"
        layers.append((f"configs/{group}/{option}.yaml", _package(path, group)))
    own = {k: v for k, v in primary.items() if k not in ("defaults", "hydra")}
    layers.append(("configs/config.yaml", own))
    return layers


def _package(path: Path, group: str) -> dict:
    """The keys a group option file sets, placed where Hydra puts them: under its group, or at
    the top level with `# @package _global_`."""
    text = path.read_text()
    tree = yaml.safe_load(text) or {}
    tree = {k: v for k, v in tree.items() if k != "defaults"}
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    if any(line.lstrip("# ").startswith("@package _global_") for line in header):
        return tree
    return {group: tree}


def _assign(sources: dict, key: str, label: str) -> None:
    """Mark `key` and every key under it (a block set as a whole) as coming from `label`."""
    for existing in sources:
        if existing == key or existing.startswith(key + "."):
            sources[existing] = label


def _flatten(tree, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _render(value) -> str:
    if isinstance(value, (list, dict, bool)) or value is None:
        return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return str(value)
