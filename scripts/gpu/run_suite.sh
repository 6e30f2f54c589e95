#!/usr/bin/env bash
# On the GPU device, after the staging calls: install the bundle and run the GPU suite.
# Writes logs and the junit report under $OUT when set.
set -uo pipefail
bash scripts/gpu/device_install.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi -L
python3 -m pytest -m gpu -p no:cacheprovider -x -q -rA --durations=10 --junitxml="$out/gpu-junit.xml" "$@" 2>&1 | tee "$out/gpu-suite.log"
# CUDA-only tests (not collected on CPU machines): the colocated trainer on a server's GPU weights
# (the 8B one has a call of its own: run_issue16.sh colocated-8b)
python3 -m pytest tests_cuda --ignore=tests_cuda/test_shared_base_8b.py --ignore=tests_cuda/test_shared_base_restart.py -p no:cacheprovider -x -q -rA -s --junitxml="$out/cuda-junit.xml" 2>&1 | tee "$out/cuda-suite.log"
