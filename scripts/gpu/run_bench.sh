#!/usr/bin/env bash
# On the GPU device, after the staging calls: the benchmark suite, or the parts named in the arguments
# (passed to bench.suite, e.g. `--only isolation`). Results accumulate in /tmp/bench while the machine
# stays warm, so each call's summary covers every part run so far; everything comes back in one
# tarball under $OUT (the device returns at most 8 files).
set -uo pipefail
bash scripts/gpu/device_install.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled \
  PYTHONUNBUFFERED=1 TINKER_TELEMETRY=0
out=${OUT:-/tmp/out}; mkdir -p "$out" /tmp/bench
nvidia-smi -L
python3 -m bench.suite --gpu --machine "${MACHINE:-h100}" --trainer-model 0.5b --out /tmp/bench "$@"
rc=$?
tail -n 30 /tmp/bench/*/*.log 2>/dev/null | tail -n 80
tar czf "$out/bench-$(date +%H%M%S).tgz" -C /tmp/bench .
exit $rc
