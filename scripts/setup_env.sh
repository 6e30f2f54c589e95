#!/usr/bin/env bash
# Creates (or reuses) the project virtualenv and installs skyrl_lora with the right extras.
# Idempotent: a stamp holding the hash of pyproject.toml and this script skips the install when
# nothing changed. Usage: scripts/setup_env.sh [extra,...]   (default: cpu or gpu by machine, plus test)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SKYRL_VENV:-$root/.venv}"
python_bin="${SKYRL_PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3

if [[ -n "${1:-}" ]]; then
  extras="$1"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extras="gpu,test"
else
  extras="cpu,test"
fi

stamp="$venv/.skyrl_stamp"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup_env.sh" | sha256sum | cut -c1-16)-$extras"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

start=$(date +%s)
echo "[setup] installing skyrl_lora[$extras] into $venv (first run takes a few minutes)" >&2
[[ -x "$venv/bin/python" ]] || "$python_bin" -m venv "$venv"
pip_q() {  # pip, minus the machine's noise about absent local index folders
  "$venv/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
  return "${PIPESTATUS[0]}"
}
pip_q install -q -U pip
pip_q install -q -e "$root[$extras]"
if [[ "$extras" == *cpu* ]]; then
  # PyPI's torchvision/torchaudio/torchcodec are built against CUDA torch; beside torch+cpu they make
  # `import transformers` fail (operator torchvision::nms does not exist). vLLM runs without them.
  pip_q uninstall -q -y torchvision torchaudio torchcodec || true
fi
if [[ "$extras" == *test* ]]; then
  # The tests drive the service with tinker-cookbook's own library code (weights.download). Its
  # transformers<=5.5.4 pin conflicts with vLLM's newer transformers, and the parts the tests use
  # need only tinker and pyrage (both dependencies of ours), so it goes in without its dependencies.
  pip_q install -q --no-deps "tinker-cookbook==0.5.8"
fi
"$venv/bin/python" - <<'PY' >&2
import importlib
for name in ("torch", "transformers", "peft", "ray", "vllm"):
    mod = importlib.import_module(name)
    print(f"[setup] {name} {getattr(mod, '__version__', '?')}")
PY
echo "$want" > "$stamp"
echo "[setup] done in $(( $(date +%s) - start )) s" >&2
