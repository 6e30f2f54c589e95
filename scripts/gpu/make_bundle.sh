#!/usr/bin/env bash
# Builds, on the CPU machine, the wheel bundle that brings vllm 0.26.0 + ray 2.60.0 (and the few test
# packages the device image lacks) to the GPU device, whose image has torch 2.11 but neither.
# Run from the project root. Writes .stage/p0..p4 (45 MiB each: one per device call, beside the working tree) and .stage/extra,
# and keeps .stage/ out of git. ~6 minutes; skipped when .stage is complete.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${WORK:-/tmp/gpu-bundle}
if [[ -f .stage/extra/.done ]]; then echo ".stage already built"; exit 0; fi
mkdir -p "$work"
python3 "$here/resolve_wheels.py" "$work/w"
# vllm trimmed: no FA2 kernels (Hopper uses FA3), no Rust frontend binary, no sm100/deep_gemm headers.
rm -rf "$work/vx" && mkdir "$work/vx"
(cd "$work/vx" && unzip -q "$work"/w/vllm-0.26.0-*.whl && rm -f vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/vllm-rs \
  && rm -rf vllm/third_party/fmha_sm100 vllm/third_party/deep_gemm && tar -cf - . | xz -6 -T2 > "$work/vllm-trim.tar.xz")
rm -rf "$work/rx" && mkdir "$work/rx"
(cd "$work/rx" && unzip -q "$work"/w/ray-2.60.0-*.whl && rm -rf ray/jars && tar -cf - . | xz -6 -T2 > "$work/ray.tar.xz")
rm -rf "$work/others" && mkdir "$work/others" && cp "$work"/w/*.whl "$work/others/" && rm "$work"/others/vllm-* "$work"/others/ray-*
(cd "$work" && tar -cf others.tar others && tar -cf bundle.tar vllm-trim.tar.xz ray.tar.xz others.tar)
rm -rf .stage && mkdir -p .stage/extra
split -b 45M -d -a 1 "$work/bundle.tar" "$work/part"
for f in "$work"/part*; do n=${f##*/part}; mkdir -p ".stage/p$n"; mv "$f" ".stage/p$n/"; done
# xgrammar needs a newer apache-tvm-ffi than vllm pins; flashinfer is imported by some code paths;
# pytest-asyncio is what our test suite needs beyond the image's pytest.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .stage/extra apache-tvm-ffi flashinfer-python==0.6.14 "pytest-asyncio==1.5.0" "pydantic-settings" "python-dotenv" \
  tinker==0.38.0 h2 hpack hyperframe orjson pyqwest zstandard rich markdown-it-py mdurl pygments "sqlalchemy>=2.0" greenlet distro \
  py-spy
touch .stage/extra/.done
mkdir -p .git/info && { grep -qx '/.stage/' .git/info/exclude 2>/dev/null || echo '/.stage/' >> .git/info/exclude; }
du -sh .stage/*
