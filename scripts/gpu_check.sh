#!/usr/bin/env bash
# The GPU check in one call: ptft's CUDA test cases, then the harness's bf16 tokens/s and
# MFU for gpt2-124m and a ~1B Llama against the Trainer. Written for a lent GPU machine that
# has torch with CUDA, pytest and most of ptft's needs but no network: the rest travels as
# wheels, fetched beforehand on a machine that has one.
#
#   bash scripts/gpu_check.sh prepare                 # here: wheels into .whl/ (.gitignore)
#   bash scripts/gpu_check.sh run OUTDIR [BENCH ARGS] # there: install them, test, benchmark
#
# `run` writes OUTDIR/gpu.json (the harness's results) and OUTDIR/gpu_check.log. Without BENCH
# ARGS the harness runs pretrain-gpt2 and pretrain-1b in bf16, 5 warm-up and 20 timed steps,
# one repeat (estimated at 5-8 minutes on one H200 with the tests; not yet measured). With
# BENCH ARGS (say `--smoke --workloads pretrain-tiny`) it runs those instead: a dry run of the
# whole script on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the GPU image lacked when last read (torch 2.11 with CUDA, transformers 5.17, no Hydra),
# at the versions ptft is tested with; regex because transformers 5.24 asks for a recent one.
PACKAGES=(transformers==5.24.0 peft==0.21.2 hydra-core==1.3.8 omegaconf==2.3.1 regex==2026.5.9)
SDIST_ONLY=(antlr4-python3-runtime==4.9.3)  # Hydra's parser: published as a source archive only
# The target machine's Python, for the compiled wheels (regex): the GPU image's python3 is 3.12;
# PYTHON_VERSION=3.11 bash scripts/gpu_check.sh prepare for a dry run on a 3.11 machine.
PYTHON_VERSION=${PYTHON_VERSION:-3.12}

prepare() {
    rm -rf .whl && mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${PACKAGES[@]}"
    python3 -m pip wheel -q --no-deps -w .whl "${SDIST_ONLY[@]}"  # pure Python: any version
    python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl .  # ptft itself
    ls -l .whl
}

run() {
    local out=${1:?usage: gpu_check.sh run OUTDIR [BENCH ARGS]}
    shift
    mkdir -p "$out"
    exec > >(tee "$out/gpu_check.log") 2>&1
    [ -d .whl ] || { echo "no .whl/: run 'bash scripts/gpu_check.sh prepare' first"; exit 2; }
    site=$(mktemp -d)  # global: the trap runs after the function has returned
    trap 'rm -rf "$site"' EXIT
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
        --format=csv,noheader || true
    python3 -c "import torch, transformers, peft, ptft; print('torch', torch.__version__,
        'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(),
        '| transformers', transformers.__version__, '| peft', peft.__version__)"
    # The code with a GPU path of its own (merged-weight LoRA, fused loss) on the device. A
    # failure is reported and the benchmark still runs: both are what the call is for.
    # -P: ptft from the installed wheel, not the checkout (whose configs/ is mapped in only by
    # an install).
    python3 -P -m pytest -q -n 0 -p no:cacheprovider -k cuda tests/test_lora_linear.py \
        tests/test_fused_loss.py || echo "CUDA test cases failed (rc $?)"
    local bench_args=("$@")
    if [ ${#bench_args[@]} -eq 0 ]; then
        bench_args=(--precision bf16 --workloads pretrain-gpt2,pretrain-1b --warmup 5 --steps 20
                    --repeats 1)
    fi
    python3 scripts/bench.py "${bench_args[@]}" --output "$out/gpu.json"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash scripts/gpu_check.sh prepare | run OUTDIR [BENCH ARGS]" >&2; exit 2 ;;
esac
