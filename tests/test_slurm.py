"""SLURM: the batch scripts, `ptft submit`, and Hydra's submitit launcher against a real
single-node cluster that the tests start on localhost (tests/slurm_cluster.py).

The cluster tests skip, saying why, only where SLURM is not installed or the tests do not run
as root (.ci/run installs `slurm-wlm` and `munge`). The script and `ptft submit` checks that
need no cluster always run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

from conftest import TINY, run_ptft
from ptft.engine import distributed
from slurm_cluster import LocalCluster, unavailable_reason

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "slurm"
# A run long enough to be signalled mid-way (a metrics row every step, few evaluations).
LONG = [*(o for o in TINY if not o.startswith("train.max_steps=")), "train.log_every=1",
        "train.save_every=100", "train.eval_every=1000"]
# One cluster for all of these: under pytest-xdist they run on the same worker.
pytestmark = pytest.mark.xdist_group("slurm")


@pytest.fixture(scope="session")
def slurm():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = LocalCluster().start()
    yield cluster
    cluster.stop()
    cluster.remove()


def job_env(cluster: LocalCluster, cache: Path) -> dict:
    """What sbatch passes on to the job: the cluster, ptft's python and data cache, one thread
    per task."""
    return {"SLURM_CONF": str(cluster.conf), "PTFT_PYTHON": sys.executable,
            "PTFT_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}


def wait_for_step(run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and f'"step": {step},' in metrics.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never came in {run_dir}")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_finished_without_duplicates(run_dir: Path, steps: int) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == steps, summary
    keys = [(row["kind"], row["step"]) for row in metrics(run_dir)]
    assert len(keys) == len(set(keys)), "duplicate metrics rows after the resume"
    assert [step for kind, step in keys if kind == "train"] == list(range(1, steps + 1))


# ---- no cluster needed ---------------------------------------------------------------------

def test_scripts_in_the_repo_are_the_template_and_valid_bash():
    from ptft.submit import STATIC_SCRIPTS, static_script

    for name in STATIC_SCRIPTS:
        path = SCRIPTS / name
        assert path.read_text() == static_script(name), \
            f"{path} differs from ptft/submit.py's template: python -m ptft.submit scripts/slurm"
        assert os.access(path, os.X_OK)
        subprocess.run(["bash", "-n", str(path)], check=True)
        text = path.read_text()
        for option in ("--signal=USR1@120", "--requeue", "--open-mode=append"):
            assert f"#SBATCH {option}\n" in text
        assert "scontrol requeue" in text and "run.name=$RUN_NAME" in text


def test_submit_dry_run_prints_the_script_and_writes_nothing(tmp_path, cache_dir):
    result = run_ptft("submit", "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "6",
                      "--time", "12:00:00", "--partition", "gpu", "--sbatch-arg=--account=lm",
                      "--dry-run", "model=llama-small", "train.lr=3e-4", "run.name=big",
                      cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=6",
                 "--time=12:00:00", "--partition=gpu", "--account=lm", "--signal=USR1@120",
                 "--requeue", "--open-mode=append", f"--chdir={tmp_path}",
                 f"--output={tmp_path}/runs/pretrain/big.out"):
        assert f"#SBATCH {line}\n" in script, line
    assert (f"set -- pretrain model=llama-small train.lr=3e-4 run.name=big "
            f"run.dir={tmp_path}/runs/pretrain/big\n") in script
    assert list(tmp_path.iterdir()) == []
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_submit_quotes_a_run_dir_that_hydra_would_split(tmp_path, cache_dir):
    import shlex

    from ptft.config.compose import compose
    work = tmp_path / "exp,v2 (old)"
    work.mkdir()
    result = run_ptft("submit", "--dry-run", "--gpus-per-node", "0", "train.lr=3e-4",
                      "run.name=big", cwd=work, cache=cache_dir)
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("set -- "))
    stage, *overrides = shlex.split(line)[2:]  # what bash hands ptft in the job
    assert compose(stage, overrides).run.dir == f"{work}/runs/pretrain/big"


def test_submit_checks_overrides_and_needs_sbatch(tmp_path, cache_dir):
    result = run_ptft("submit", "train.lrr=1", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 2 and "unknown key 'train.lrr'" in result.stderr
    result = run_ptft("submit", "--time", "soon", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 2 and "--time" in result.stderr
    # No SLURM client commands on PATH: one clear line, exit 2, nothing written.
    result = run_ptft("submit", cwd=tmp_path, cache=cache_dir,
                      env={"PATH": str(Path(sys.executable).parent)})
    assert result.returncode == 2, result.stderr
    assert "sbatch was not found" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


SRUN_TASK = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0",
             "SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "gpu[07-08]",
             "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.99"}
NODE_LISTS = ["gpu[07-09,12],cpu1", "rack[2-3]-n[1-4]", "node01", "a,b", "x[001-004]",
              "c1,c[2-3]"]


@pytest.mark.parametrize("preset", [{}, {"MASTER_ADDR": "head", "MASTER_PORT": "29500"},
                                    {"SLURM_STEP_NODELIST": None}])
def test_an_srun_task_gets_torchrun_names_and_rank_zeros_node(preset):
    task = {name: value for name, value in {**SRUN_TASK, **preset}.items() if value is not None}
    # A copy of the environment that is put back whole afterwards: RANK and WORLD_SIZE left
    # behind would make every later ptft subprocess of this test process wait for its peers.
    with mock.patch.dict(os.environ, task):
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_NODELIST",
                     *(n for n in ("MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NODELIST")
                       if n not in task)):
            os.environ.pop(name, None)
        distributed._slurm_to_torchrun_env()
        env = dict(os.environ)
    assert os.environ.get("RANK") != "2"  # put back
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("2", "4", "0")
    if "MASTER_ADDR" in preset:  # the batch scripts export them: kept
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("head", "29500")
    elif "SLURM_STEP_NODELIST" in preset:  # no node list (an old SLURM): the launching node
        assert env["MASTER_ADDR"] == "10.0.0.99"
    else:  # rank 0's node, not the launching one (a login node, outside the allocation)
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu07", "21234")


# ---- a real cluster -----------------------------------------------------------------------

def test_first_node_of_a_node_list_agrees_with_scontrol(slurm):
    for nodes in NODE_LISTS:
        expanded = subprocess.run(["scontrol", "show", "hostnames", nodes], env=slurm.env,
                                  capture_output=True, text=True, check=True).stdout.split()
        assert distributed.first_node(nodes) == expanded[0], nodes


def test_submitted_job_trains_and_writes_its_run_dir(slurm, tmp_path, cache_dir):
    # sbatch reads '#SBATCH' lines with their own rules (whitespace splits, '#' starts a
    # comment, '%j' in --output is the job id): a folder name with all three must survive.
    work = tmp_path / "exp #2 at 50%j"
    work.mkdir()
    result = run_ptft("submit", "--gpus-per-node", "0", "--time", "5", *TINY,
                      "run.name=submitted", cwd=work, cache=cache_dir,
                      env=job_env(slurm, cache_dir))
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"submitted job (\d+)", result.stdout).group(1)
    info = slurm.wait_for_job(job_id, timeout=150)
    assert info["ExitCode"] == "0:0"
    runs = work / "runs" / "pretrain"
    log = (runs / "submitted.out").read_text()
    assert (runs / "submitted.sbatch").exists()
    assert "run summary" in log, log[-3000:]
    summary = json.loads((runs / "submitted" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["world_size"] == 1
    assert (runs / "submitted" / "final" / "model.safetensors").exists()


def test_signalled_job_saves_requeues_and_resumes_in_the_same_run_dir(slurm, tmp_path,
                                                                       cache_dir):
    """The ready-made script on 2 CPU tasks (two ranks through srun, gloo): SIGUSR1 to the job
    (what --signal=USR1@120 sends before the time limit) -> every rank saves and exits 75 ->
    the script requeues the job -> the rerun resumes in runs/pretrain/<name>-<id> and finishes."""
    submitted = slurm.run("sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=2",
                          "--cpus-per-task=1", "--time=5", str(SCRIPTS / "single_node.sbatch"),
                          "pretrain", *LONG, "train.max_steps=600", cwd=tmp_path, env=job_env(slurm, cache_dir))
    job_id = submitted.stdout.strip()
    run_dir = tmp_path / "runs" / "pretrain" / f"ptft-{job_id}"
    wait_for_step(run_dir, 5)
    slurm.run("scancel", "--signal=USR1", job_id)
    slurm.wait_for_job(job_id, timeout=180)
    info = slurm.job(job_id)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info

    log = (tmp_path / f"ptft-{job_id}.out").read_text()  # one log, appended across restarts
    assert "stopped by SIGUSR1" in log and "(exit 75): requeueing" in log, log[-3000:]
    assert f"job {job_id} (restart 1)" in log and "resuming from" in log, log[-3000:]
    stopped = int(re.search(r"stopped by SIGUSR1 at step (\d+)", log).group(1))
    assert (run_dir / "checkpoints" / f"step-{stopped:06d}" / "COMPLETE").exists()
    assert f"resuming from {run_dir.relative_to(tmp_path)}/checkpoints/step-{stopped:06d}" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert_finished_without_duplicates(run_dir, 600)


def test_submitit_multirun_completes_and_requeued_jobs_resume(slurm, tmp_path, cache_dir):
    """`-m hydra/launcher=submitit_slurm`: an array of two jobs, each interrupted mid-run.
    Job 0 gets submitit's own signal (SIGUSR2: what it asks for before the time limit): ptft
    saves at the next step boundary, then submitit requeues the job. Job 1 is requeued by SLURM
    (as a preemption is: SIGTERM, then a restart). Each resumes in its own run directory (sweep
    dir + job number) and finishes."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="the submitit launcher is not installed: pip install -e '.[slurm]'")
    env = {**os.environ, "COLUMNS": "200", **job_env(slurm, cache_dir)}
    sweep = subprocess.Popen(
        [sys.executable, "-m", "ptft", "pretrain", "-m", "hydra/launcher=submitit_slurm",
         "hydra.launcher.timeout_min=5", "hydra.launcher.max_num_timeout=2",
         "hydra.launcher.cpus_per_task=1", *LONG,
         "train.max_steps=600", "train.lr=1e-3,2e-3"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("runs/pretrain/multirun-*/job-*/metrics.jsonl"))) < 2:
            assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()[0]
            time.sleep(0.1)
        sweep_dir = next(tmp_path.glob("runs/pretrain/multirun-*"))
        for job in ("job-0", "job-1"):
            wait_for_step(sweep_dir / job, 5)
        tasks = {task[-1]: task for task in slurm.run("squeue", "-h", "-o", "%i").stdout.split()}
        slurm.run("scancel", "--signal=USR2", tasks["0"])
        slurm.run("scontrol", "requeue", tasks["1"])
        output, _ = sweep.communicate(timeout=180)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.communicate()
    assert sweep.returncode == 0, output[-3000:]

    for num in ("0", "1"):
        run_dir = sweep_dir / f"job-{num}"
        assert_finished_without_duplicates(run_dir, 600)
        log = "".join(p.read_text() for p in sweep_dir.glob(f".submitit/{tasks[num]}/*.out"))
        assert log.count(f"run dir: {run_dir.resolve()}") == 2, log[-3000:]
        signal_name = "SIGUSR1" if num == "0" else "SIGTERM"  # ptft relays submitit's USR2
        stopped = re.search(rf"stopped by {signal_name} at step (\d+)", log)
        assert stopped, log[-3000:]
        checkpoint = run_dir.resolve() / "checkpoints" / f"step-{int(stopped.group(1)):06d}"
        assert f"resuming from {checkpoint}" in log, log[-3000:]
