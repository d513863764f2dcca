#!/usr/bin/env bash
# The test suite against the oldest releases pyproject.toml allows: the lower bounds there are
# the versions this was last run with, so a user whose environment already holds an older
# transformers or torch gets pip's upgrade rather than a crash.
#
#   bash scripts/oldest_deps.sh [VENV_DIR] [PYTEST ARGS...]
#
# uv (pip install uv) resolves the direct dependencies to their lowest allowed releases
# (--resolution lowest-direct) into a virtual environment made afresh each time, so nothing
# newer stays behind (default /tmp/ptft-oldest; interpreter: $PYTHON, default python3), then
# the README's test command runs there. Needs a registry: the oldest torch allowed comes as its
# CUDA build from PyPI (~3 GB with the NVIDIA libraries, which a CPU run never loads).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${1:-/tmp/ptft-oldest}
shift || true
command -v uv >/dev/null || { echo "oldest_deps.sh: needs uv (pip install uv)" >&2; exit 2; }

uv venv -q --clear -p "${PYTHON:-python3}" "$venv"
VIRTUAL_ENV=$venv uv pip install -q --resolution lowest-direct -e ".[dev,plot,tensorboard,slurm]"
"$venv/bin/python" - <<'EOF'
from importlib.metadata import version
import sys
print("python", sys.version.split()[0], *(f"{p} {version(p)}" for p in (
    "torch", "transformers", "tokenizers", "datasets", "peft", "hydra-core", "omegaconf",
    "typer", "rich", "safetensors", "numpy", "pytest", "matplotlib", "tensorboard",
    "submitit")), sep=" | ")
EOF
# The suite starts `ptft` and `torchrun` as subprocesses: the venv's, first on PATH.
PATH="$venv/bin:$PATH" "$venv/bin/python" -m pytest -q "$@"
