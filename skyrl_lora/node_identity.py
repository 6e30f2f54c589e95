"""Which node a process runs on, as far as node-local resources (/dev/shm, local paths) go."""

from __future__ import annotations

import socket
from pathlib import Path


def node_identity() -> str:
    """The Ray node's id inside Ray (a second Ray node on one host counts as another node, as it
    would be on a real cluster, so that path is exercised on one machine), else the host and its
    boot id (processes of one boot share /dev/shm)."""
    try:
        import ray

        if ray.is_initialized():
            return "ray:" + str(ray.get_runtime_context().get_node_id())
    except ImportError:
        pass
    boot = Path("/proc/sys/kernel/random/boot_id")
    return f"host:{socket.gethostname()}:{boot.read_text().strip() if boot.is_file() else ''}"
