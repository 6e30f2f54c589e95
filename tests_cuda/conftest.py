"""CUDA-only tests (run on the device by scripts/gpu/run_suite.sh, never collected on a CPU machine:
they are not in pytest's testpaths). The shared fixtures are the CPU suite's."""

from tests.conftest import ray_local, tiny, tok  # noqa: F401 (pytest fixtures)
