"""`ptft submit`: write a SLURM batch script for a run and hand it to `sbatch`.

One template makes both the ready-made scripts in scripts/slurm/ and the scripts `ptft submit`
writes (tests/test_slurm.py checks that the files in scripts/slurm/ are what `render` gives).
The script:

* starts one task per GPU with `srun` (one per CPU worker on CPU-only nodes); ptft maps
  SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID to ranks (ptft/engine/distributed.py), NCCL on
  GPUs, gloo on CPUs. One task per GPU rather than `torchrun` inside one task: the same script
  serves one node and many, SLURM's `--signal` reaches every rank directly (a torchrun agent
  would die of SIGUSR1), and ptft's exit code 75 comes back through srun unchanged;
* asks for SIGUSR1 120 s before the time limit (`--signal=USR1@120`, sent to the job steps,
  i.e. every ptft process, not to the batch shell): ptft saves at the next step boundary and
  exits 75, and the script requeues the job (`--requeue`, `scontrol requeue`);
* runs in a run directory that a requeued job finds again: run.name=<job name>-<job id> (a
  requeued job keeps its id) in the ready-made scripts, a fixed run.dir in submitted ones; ptft
  resumes from the newest complete checkpoint there;
* appends to one log across restarts (`--open-mode=append`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ptft.errors import UsageError

_BODY = r"""
set -uo pipefail  # not -e: the script must see ptft's exit status to requeue on 75

STAGE=${1:?usage: sbatch SCRIPT pretrain|finetune [OVERRIDES...]}
shift

# Every rank joins rank 0 on the job's first node; the port is derived from the job id so two
# jobs sharing a node do not collide (export MASTER_PORT before sbatch to choose one).
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# srun (unlike torchrun) leaves the thread count alone: one thread per CPU of the task.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
PYTHON=${PTFT_PYTHON:-__PYTHON__}

# A requeued job keeps its id, so it finds this run directory again and ptft resumes there.
# (An explicit run.dir= or run.name= among the overrides wins.)
RUN_NAME=${SLURM_JOB_NAME}-${SLURM_JOB_ID}

echo "$(date '+%F %T') job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST," \
     "$SLURM_NTASKS task(s): ptft $STAGE run.name=$RUN_NAME $*"
# --kill-on-bad-exit=0: after a stop every rank exits 75 within moments; srun must not kill the
# slower ones (their exit status would hide the 75).
srun --kill-on-bad-exit=0 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \
    "$PYTHON" -m ptft "$STAGE" "run.name=$RUN_NAME" "$@"
status=$?

# 75: ptft saved a checkpoint on a signal (SIGUSR1 before the time limit, SIGTERM on
# preemption) and stopped. Put the job back in the queue; its next start resumes.
if [ "$status" -eq 75 ]; then
    echo "$(date '+%F %T') ptft stopped after saving (exit 75): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"""

_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


@dataclass
class Resources:
    """What the batch script asks SLURM for."""
    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int | None = None
    """Processes per node; default: one per GPU (one on CPU-only nodes)."""
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    job_name: str = "ptft"
    output: str = "%x-%j.out"
    chdir: str | None = None
    signal_seconds: int = 120
    extra: list[str] = field(default_factory=list)
    """More #SBATCH options, verbatim (e.g. --account=abc)."""

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    def check(self) -> None:
        if self.nodes < 1:
            raise UsageError(f"--nodes={self.nodes}: a job needs at least one node.")
        if self.gpus_per_node < 0:
            raise UsageError(f"--gpus-per-node={self.gpus_per_node} cannot be negative "
                             "(0: CPU-only nodes).")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise UsageError(f"--tasks-per-node={self.tasks_per_node}: at least one task.")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise UsageError(f"--tasks-per-node={self.tasks_per_node} with --gpus-per-node="
                             f"{self.gpus_per_node}: ptft runs one process per GPU; leave "
                             "--tasks-per-node out.")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise UsageError(f"--cpus-per-task={self.cpus_per_task}: at least one CPU.")
        if self.time is not None and not _TIME.match(self.time):
            raise UsageError(f"--time={self.time!r} is not a SLURM time limit; use MINUTES, "
                             "HH:MM:SS or DAYS-HH:MM:SS.")
        for option in self.extra:
            if not option.startswith("-"):
                raise UsageError(f"--sbatch-arg={option!r}: give a full sbatch option such as "
                                 "--account=NAME.")


def render(resources: Resources, command: list[str] | None = None,
           python: str = "python", comment: str = "") -> str:
    """The batch script. `command` (stage + overrides) is baked in when given; otherwise the
    script takes it as its arguments: `sbatch SCRIPT pretrain OVERRIDES...`."""
    r = resources
    lines = ["#!/bin/bash"]
    lines += [f"# {line}" if line else "#" for line in comment.strip().splitlines()]
    sbatch = [f"--job-name={_sbatch_word(r.job_name)}", f"--nodes={r.nodes}", f"--ntasks-per-node={r.tasks}"]
    if r.gpus_per_node:
        sbatch.append(f"--gpus-per-node={r.gpus_per_node}")
    if r.cpus_per_task:
        sbatch.append(f"--cpus-per-task={r.cpus_per_task}")
    if r.time:
        sbatch.append(f"--time={r.time}")
    if r.partition:
        sbatch.append(f"--partition={r.partition}")
    sbatch += [f"--signal=USR1@{r.signal_seconds}", "--requeue", "--open-mode=append",
               f"--output={_sbatch_word(r.output)}"]
    if r.chdir:
        sbatch.append(f"--chdir={_sbatch_word(r.chdir)}")
    sbatch += r.extra
    lines += [f"#SBATCH {option}" for option in sbatch]
    if command:
        lines += ["", "# The run, fixed when the script was written (ptft submit):",
                  "set -- " + " ".join(shlex.quote(word) for word in command)]
    return "\n".join(lines) + "\n" + _BODY.replace("__PYTHON__", python)


def _sbatch_word(text: str) -> str:
    """`text` as one argument of an #SBATCH line. sbatch splits those lines at whitespace,
    reads quotes and backslashes, and drops everything after an unquoted '#': a run
    directory such as 'my runs/exp #2' would become two arguments and a comment."""
    if not any(c.isspace() or c in "\"'\\#" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def literal_file_name(path: str) -> str:
    """`path` for sbatch --output, which reads '%j', '%x', ... as the job id, name, ...: a
    literal '%' is written '%%' (a path with a backslash is taken literally by SLURM anyway)."""
    return path if "\\" in path else path.replace("%", "%%")


# The ready-made scripts in scripts/slurm/ (regenerate: python -m ptft.submit scripts/slurm).
STATIC_SCRIPTS = {
    "single_node.sbatch": (
        Resources(nodes=1, gpus_per_node=8, cpus_per_task=8, time="24:00:00"),
        """ptft on one node with several GPUs: one srun task (one ptft process) per GPU.

  sbatch scripts/slurm/single_node.sbatch pretrain model=llama-small train.max_steps=20000
  sbatch --gpus-per-node=4 --ntasks-per-node=4 scripts/slurm/single_node.sbatch finetune method=lora

Change the #SBATCH lines (or override them on the sbatch command line, as above) to fit your
cluster: --partition, --account, GPUs and tasks per node (keep them equal), --time.
Preemption and time limits: ptft saves and exits 75 on SIGUSR1/SIGTERM; this script requeues
the job and the next start resumes in the same run directory (runs/<stage>/<job name>-<job id>).
Set PTFT_PYTHON to the python of the environment where ptft is installed (default: python)."""),
    "multi_node.sbatch": (
        Resources(nodes=2, gpus_per_node=8, cpus_per_task=8, time="24:00:00"),
        """ptft on several nodes: one srun task (one ptft process) per GPU on every node; rank 0
runs on the first node of the allocation (MASTER_ADDR).

  sbatch scripts/slurm/multi_node.sbatch pretrain model=llama-1b train.strategy=fsdp
  sbatch --nodes=4 scripts/slurm/multi_node.sbatch pretrain model=llama-1b train.strategy=fsdp

Global batch = train.batch_size x train.grad_accum x nodes x GPUs per node.
Change the #SBATCH lines (or override them on the sbatch command line) to fit your cluster.
Preemption and time limits: ptft saves and exits 75 on SIGUSR1/SIGTERM; this script requeues
the job and the next start resumes in the same run directory (runs/<stage>/<job name>-<job id>).
Set PTFT_PYTHON to the python of the environment where ptft is installed (default: python)."""),
}


def static_script(name: str) -> str:
    resources, comment = STATIC_SCRIPTS[name]
    return render(resources, comment=comment)


def submit(stage: str, overrides: list[str], resources: Resources, dry_run: bool = False,
           out=None) -> str:
    """Validate the run's config, write runs/<stage>/<name>.sbatch and submit it; returns the
    job id (or the script, with dry_run, which writes nothing)."""
    from ptft.config.compose import compose, group_options, override
    from ptft.engine.rundir import check_run_name
    from ptft.errors import did_you_mean

    out = out or sys.stdout
    stages = group_options("stage")
    if stage not in stages:
        raise UsageError(f"unknown stage '{stage}'.{did_you_mean(stage, stages)} "
                         f"Stages: {', '.join(stages)}.")
    resources.check()
    cfg = compose(stage, overrides)  # every mistake is reported now, not in the queue
    sbatch = shutil.which("sbatch")
    if not dry_run and sbatch is None:
        raise UsageError("sbatch was not found: `ptft submit` needs the SLURM client commands "
                         "(run it on a cluster's login node). `ptft submit --dry-run` prints "
                         "the batch script without submitting it.")

    cwd = Path.cwd()
    if cfg.run.dir:
        run_dir = (cwd / Path(cfg.run.dir).expanduser()).resolve()
    else:
        parent = (cwd / Path(cfg.run.root).expanduser() / cfg.stage.name).resolve()
        name = check_run_name(cfg.run.name) if cfg.run.name else _new_name(parent)
        run_dir = parent / name
    script_path = run_dir.parent / f"{run_dir.name}.sbatch"
    resources.chdir = str(cwd)
    log = resources.output
    if resources.output == Resources.output:  # the log next to the script, across restarts
        log = str(run_dir.parent / f"{run_dir.name}.out")
        resources.output = literal_file_name(log)
    if resources.job_name == Resources.job_name:
        resources.job_name = f"ptft-{stage}"
    arguments = [*overrides, override("run.dir", run_dir)]
    compose(stage, arguments)  # what the job will run, checked here rather than in the queue
    script = render(resources, [stage, *arguments], python=sys.executable,
                    comment=f"Written by `ptft submit` on {time.strftime('%Y-%m-%d %H:%M:%S')}; "
                            f"run directory {run_dir}.\nResubmit (resumes): sbatch {script_path}")
    if dry_run:
        out.write(script)
        return script

    try:
        script_path.parent.mkdir(parents=True, exist_ok=True)
        script_path.write_text(script)
    except OSError as err:
        raise UsageError(f"cannot write {script_path}: {err.strerror}; set run.root or run.dir "
                         "to a writable place.") from None
    result = subprocess.run([sbatch, "--parsable", str(script_path)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        script_path.unlink(missing_ok=True)
        message = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        raise UsageError(f"sbatch refused the job: {message}")
    job_id = result.stdout.strip().split(";")[0]
    out.write(f"submitted job {job_id}: ptft {stage} in {run_dir}\n"
              f"  script {script_path}\n  log    {log}\n"
              f"  follow: tail -f {shlex.quote(log)}   cancel: scancel {job_id}\n")
    return job_id


def _new_name(parent: Path) -> str:
    """A timestamp, like the run directories ptft names itself; -1, -2, ... if taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        name = stamp if attempt == 0 else f"{stamp}-{attempt}"
        if not (parent / name).exists() and not (parent / f"{name}.sbatch").exists():
            return name
    raise UsageError(f"no free run name under {parent}; give run.name=NAME.")


def write_static_scripts(folder: str | os.PathLike) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in STATIC_SCRIPTS:
        path = folder / name
        path.write_text(static_script(name))
        path.chmod(0o755)


if __name__ == "__main__":  # python -m ptft.submit scripts/slurm
    write_static_scripts(sys.argv[1] if len(sys.argv) > 1 else "scripts/slurm")
