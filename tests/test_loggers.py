"""Metric loggers: metrics.jsonl always, TensorBoard event files on request (read back with
TensorBoard's own reader), and the fan-out that leaves the loop alone."""

from __future__ import annotations

import json
import math

import pytest

from conftest import TINY, run_ptft
from ptft.engine import metrics as metrics_module
from ptft.engine.metrics import MetricsLog, check_loggers
from ptft.errors import UsageError


def test_tensorboard_reader_loads_the_scalars_ptft_wrote(tmp_path, cache_dir):
    pytest.importorskip("tensorboard", reason="the tensorboard package (the tensorboard extra) "
                                              "is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_ptft("pretrain", *TINY, "train.save_every=0", "run.dir=run",
                      "run.loggers=[jsonl,tensorboard]", cwd=tmp_path, cache=cache_dir,
                      env={"OMP_NUM_THREADS": "1"})  # tiny model: one thread is fastest
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss",
            "eval/ppl"} <= tags
    for tag, kind, key in (("train/loss", "train", "loss"), ("train/lr", "train", "lr"),
                           ("eval/loss", "eval", "eval_loss"), ("eval/ppl", "eval", "eval_ppl")):
        expected = [(r["step"], r[key]) for r in rows if r["kind"] == kind]
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [step for step, _ in expected], tag
        assert [s.value for s in scalars] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert [s.step for s in events.Scalars("eval/loss")] == [0, 6, 12]


def test_tensorboard_missing_is_a_usage_error_before_training(tmp_path, cache_dir):
    shim = tmp_path / "shim" / "tensorboard"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    result = run_ptft("pretrain", *TINY, "run.dir=run", "run.loggers=[tensorboard]",
                      cwd=tmp_path, cache=cache_dir,
                      env={"PYTHONPATH": str(shim.parent), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pip install 'ptft[tensorboard]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step ran, nothing logged


def test_unknown_logger_suggests_the_closest():
    with pytest.raises(UsageError, match="Did you mean 'tensorboard'"):
        check_loggers(["jsonl", "tensorbord"])
    assert check_loggers([]) == ["jsonl"]  # metrics.jsonl is always written


class Memory(metrics_module.Logger):
    """A stand-in for a W&B or MLflow backend: only write() and close()."""
    rows: list[dict] = []
    closed = False

    def __init__(self, run_dir):
        Memory.rows, Memory.closed = [], False

    def write(self, row: dict) -> None:
        Memory.rows.append(row)

    def close(self) -> None:
        Memory.closed = True


def test_a_new_backend_is_one_class_and_one_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(metrics_module.LOGGERS, "memory", Memory)
    log = MetricsLog(tmp_path / "metrics.jsonl", loggers=["memory"])
    rows = [{"kind": "eval", "step": 0, "eval_loss": 5.0},
            {"kind": "train", "step": 1, "loss": math.nan, "nonfinite": True}]
    for row in rows:
        log.write(row)
    log.close()
    assert Memory.rows == rows and Memory.closed
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert written[0] == rows[0] and written[1]["loss"] == "nan"  # JSON has no NaN

    quiet = MetricsLog(tmp_path / "other" / "metrics.jsonl", enabled=False, loggers=["memory"])
    quiet.write(rows[0])
    quiet.close()
    assert not (tmp_path / "other").exists()  # ranks other than 0 write nothing


def test_summary_json_stays_valid_json_with_non_finite_values(tmp_path):
    import math

    from ptft.engine.distributed import World
    from ptft.engine.run_report import write_summary
    write_summary(tmp_path, {"eval_loss": math.nan, "train_loss": math.inf, "steps": 3}, World())

    def refuse(constant):
        raise ValueError(f"bare {constant} is not JSON")
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert summary == {"eval_loss": "nan", "train_loss": "inf", "steps": 3}
