"""The code passes ruff (every package of the repository) and mypy --strict (the whole skyrl_lora
package). Both read their settings from pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    done = _run("ruff", "check", "skyrl_lora", "tests", "tests_cuda", "bench", "examples")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_typed_modules_pass_mypy_strict() -> None:
    done = _run("mypy")
    assert done.returncode == 0, done.stdout + done.stderr
