#!/usr/bin/env bash
# On the GPU device: assemble the parts that earlier calls copied to /tmp/st (and /tmp/st/extra) and
# install vllm + ray into /tmp/site. Afterwards: export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0
set -e
[ -d /tmp/site/vllm ] && { echo "already installed"; exit 0; }
cd /tmp/st
cat $(ls part* | sort) > bundle.tar && tar -xf bundle.tar
mkdir -p /tmp/site && tar -xJf vllm-trim.tar.xz -C /tmp/site && tar -xJf ray.tar.xz -C /tmp/site && tar -xf others.tar
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site others/*.whl
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site extra/*.whl
PYTHONPATH=/tmp/site python3 -c "import vllm, ray, torch; print('vllm', vllm.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"
