#!/usr/bin/env bash
# The two entry points of the README. Each installs what it needs (scripts/setup_env.sh is
# idempotent and quick once done), then runs inside the project virtualenv.
#   ./run.sh demo [args]   the multi-tenant demo on the embedded default (local Ray, CPU vLLM, tiny model)
#   ./run.sh test [args]   the test suite (pytest), as CI runs it
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${SKYRL_VENV:-$root/.venv}"
cmd="${1:-}"
shift || true
bash "$root/scripts/setup_env.sh"
export PATH="$venv/bin:$PATH"
# Ray 2.60 turns token authentication on by default; a local single-user cluster does not need it.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
# Nothing may be fetched from a model hub at run time.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
case "$cmd" in
  demo) exec "$venv/bin/skyrl-lora" demo "$@" ;;
  test) cd "$root" && exec "$venv/bin/python" -m pytest "$@" ;;
  *) echo "usage: ./run.sh demo|test [args]" >&2; exit 2 ;;
esac
