"""Hydra multirun (-m): one training job per combination of swept values.

The sweep goes through Hydra's own entry point, so every Hydra launcher works (the local one
by default; a cluster one such as submitit with `hydra/launcher=...`). Every combination is
composed and validated before the first job starts, so a typo fails the sweep up front.
"""

from __future__ import annotations

import sys

from ptft.config import compose as composing
from ptft.errors import EXIT_PREEMPTED, EXIT_USAGE, Preempted, UsageError, first_line


def expand(overrides: list[str]) -> list[list[str]]:
    """Every job's overrides: ['a=1,2', 'b=3'] -> [['a=1', 'b=3'], ['a=2', 'b=3']]."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    # Hydra's own settings (hydra.*, hydra/launcher=...) are not part of a job's config.
    own = [o for o in overrides if not _is_hydra_override(o)]
    try:
        parsed = OverridesParser.create().parse_overrides(own)
    except HydraException as err:
        raise UsageError(f"malformed override: {first_line(err)}") from None
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def run_multirun(stage: str, overrides: list[str]) -> None:
    jobs = expand(overrides)
    for job in jobs:
        composing.compose(stage, [o for o in job])
    import hydra

    sys.argv = ["ptft", "--multirun", f"stage={stage}", *overrides]
    entry = hydra.main(config_path=str(composing.config_dir()), config_name="config",
                       version_base="1.3")(_job)
    entry()


def _job(cfg) -> dict:
    """One sweep job: Hydra composed `cfg`; validate it and run it in Hydra's job directory."""
    from hydra.core.hydra_config import HydraConfig
    from rich.console import Console
    from rich.markup import escape

    from ptft.engine.executor import execute

    console = Console()
    try:
        composing.validate(cfg)
        run = composing.to_object(cfg)
        run.run.dir = run.run.dir or HydraConfig.get().runtime.output_dir
        return execute(run, console)
    except UsageError as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        sys.exit(EXIT_USAGE)
    except Preempted as err:
        console.print(f"[red]stopped:[/] {escape(str(err))}", highlight=False)
        sys.exit(EXIT_PREEMPTED)


def _is_hydra_override(override: str) -> bool:
    key = override.lstrip("+~").split("=")[0]
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))
