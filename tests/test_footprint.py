"""scripts/footprint.py: a smoke run of its three checks (start-up, repeated data preparation,
memory on a larger corpus) through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "footprint.py"


def test_smoke_run_reports_startup_data_prep_and_corpus_memory(tmp_path):
    output = tmp_path / "footprint.json"
    env = {**os.environ, "PTFT_PEAK_FLOPS": "1e11", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--workdir",
                           str(tmp_path / "work"), "--output", str(output)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(output.read_text())
    # --help answers without importing torch: a fraction of `import torch` alone.
    assert results["startup"]["help_vs_import_torch"] < 1
    prep = results["data-prep"]
    assert prep["second"]["data_prep_s"] < prep["first"]["data_prep_s"]  # the cache hit
    memory = results["corpus-memory"]
    assert memory["token_ratio"] > 5
    assert abs(memory["rss_change"]) < 0.15  # memory-mapped tokens: RSS does not follow them
    assert "peak RSS" in proc.stdout and "ptft --help / import torch" in proc.stdout
