"""Hydra multirun (-m): one training job per combination of swept values.

The sweep goes through Hydra's own entry point, so every Hydra launcher works (the local one
by default; a cluster one such as submitit with `hydra/launcher=...`). Every combination is
composed and validated before the first job starts, so a typo fails the sweep up front.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ptft.config import compose as composing
from ptft.errors import (EXIT_FAILURE, EXIT_PREEMPTED, EXIT_USAGE, Preempted, TrainingFailed,
                         UsageError, first_line)

# The jobs of this sweep that failed, as (exit code, job number): a failed job (a diverging
# learning rate, a bad file) does not stop the others; the sweep's exit code reports it.
_failed: list[tuple[int, int]] = []


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
    _check_launcher(overrides)
    jobs = expand(overrides)
    for job in jobs:
        composing.compose(stage, [o for o in job])
    import hydra

    sys.argv = ["ptft", "--multirun", f"stage={stage}",
                *composing.with_option_keys(stage, overrides)]
    entry = hydra.main(config_path=str(composing.config_dir()), config_name="config",
                       version_base="1.3")(_job)
    _failed.clear()
    entry()
    if _failed:  # with a local launcher; a cluster launcher's jobs report in their own logs
        from rich.console import Console
        listed = ", ".join(f"job {num} (exit {code})" for code, num in _failed)
        Console(stderr=True).print(f"[red]sweep:[/] {len(_failed)} of {len(jobs)} jobs failed: "
                                   f"{listed}", highlight=False)
        raise SystemExit(EXIT_USAGE if all(c == EXIT_USAGE for c, _ in _failed)
                         else EXIT_FAILURE)


def _job(cfg) -> dict:
    """One sweep job: Hydra composed `cfg`; validate it and run it in Hydra's job directory."""
    from hydra.core.hydra_config import HydraConfig
    from rich.console import Console
    from rich.markup import escape

    from ptft.engine.executor import execute

    console = Console()
    requeue_with_submitit = _submitit_signal_to_ptft()
    job = HydraConfig.get().job.num
    try:
        composing.validate(cfg)
        run = composing.to_object(cfg)
        run.run.dir = _job_dir(run, job) or HydraConfig.get().runtime.output_dir
        return execute(run, console)
    except (UsageError, TrainingFailed) as err:
        console.print(f"[red]error:[/] job {job}: {escape(str(err))}", highlight=False)
        _failed.append((EXIT_USAGE if isinstance(err, UsageError) else EXIT_FAILURE, job))
        if "BasicLauncher" not in str(HydraConfig.get().launcher.get("_target_", "")):
            sys.exit(_failed[-1][0])  # a process of its own (a cluster job): its code tells
        return {"status": "failed", "reason": str(err)}
    except Preempted as err:
        console.print(f"[red]stopped:[/] {escape(str(err))}", highlight=False)
        requeue_with_submitit()  # the checkpoint is saved: now submitit may requeue the job
        sys.exit(EXIT_PREEMPTED)


def _job_dir(run, job: int) -> str | None:
    """run.dir or run.name given to a sweep names the sweep's folder, one job-N per job
    inside (as Hydra's own multirun-<time>/job-N): taken as is, every job would write into
    the same run directory. None: Hydra's folder."""
    from ptft.engine.rundir import check_run_name

    if run.run.dir:
        base = Path(run.run.dir)
    elif run.run.name:
        base = Path(run.run.root) / run.stage.name / check_run_name(run.run.name)
    else:
        return None
    return str(base / f"job-{job}")


def _submitit_signal_to_ptft():
    """Under Hydra's submitit launcher, submitit's handler for its signal (SIGUSR2: the time
    limit is near, or a preemption) requeues the job and exits at once, mid-step, losing the
    steps since the last checkpoint. Relay that signal to ptft's own stop request instead
    (save at the next step boundary, then Preempted), and return what lets submitit requeue
    afterwards. Outside submitit: nothing changes and the returned call does nothing."""
    import signal

    if "submitit" not in sys.modules:  # submitit's job runner imported it before this job
        return lambda: None
    from submitit.core.job_environment import JobEnvironment

    sig = JobEnvironment._usr_sig()
    submitit_handler = signal.getsignal(sig)
    if type(getattr(submitit_handler, "__self__", None)).__module__.split(".")[0] != "submitit":
        return lambda: None
    fired = []

    from ptft.engine.signals import StopRequests

    def relay(signum, frame):
        fired.append(signum)
        ptft_handler = signal.getsignal(signal.SIGUSR1)
        if isinstance(getattr(ptft_handler, "__self__", None), StopRequests):
            ptft_handler(signal.SIGUSR1, frame)  # inside the training loop: save, then stop
        else:
            submitit_handler(signum, frame)  # setting up or finishing: nothing to save

    signal.signal(sig, relay)
    return lambda: submitit_handler(sig, None) if fired else None


def _is_hydra_override(override: str) -> bool:
    key = override.lstrip("+~").split("=")[0]
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def _check_launcher(overrides: list[str]) -> None:
    """hydra/launcher=submitit_* needs an optional plugin: say how to get it, up front."""
    import importlib.util

    for override in overrides:
        if not override.startswith("hydra/launcher=submitit"):
            continue
        try:
            found = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
        except ImportError:  # not even the hydra_plugins namespace
            found = False
        if not found:
            raise UsageError(f"{override} needs Hydra's submitit launcher, which is not "
                             "installed: pip install 'ptft[slurm]' (hydra-submitit-launcher).")
