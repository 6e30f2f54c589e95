"""A Ray cluster of one or more nodes on this machine, started with ``ray start`` and stopped on its own.

``ray stop`` ends every Ray process on the machine, the test session's own cluster included, which
once forced the test that needs ``ray start`` to run first (by file name). Here each node's
``ray start --block`` runs in a process session of its own, so stopping the cluster means ending the
processes of those sessions and nothing else; the cluster's own temp dir keeps its address file away
from the session's cluster. Nodes take loopback addresses (127.0.0.1, 127.0.0.2, ...), so a second
node has an address of its own without any traffic leaving the machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LocalRayCluster:
    """Handles of a running local multi-node cluster."""

    gcs_address: str
    dashboard_url: str | None
    env: dict[str, str]
    temp_dir: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def python(self, *args: str, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run a Python driver connected to this cluster (a process can join only one cluster)."""
        return subprocess.run([sys.executable, *args], env={**self.env, "RAY_ADDRESS": self.gcs_address},
                              capture_output=True, text=True, timeout=timeout, cwd=cwd)


_PROBE = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
want, deadline, seen = int(sys.argv[2]), time.monotonic() + float(sys.argv[3]), -1
while time.monotonic() < deadline:
    alive = sum(1 for n in ray.nodes() if n["Alive"])
    if alive != seen:
        print(alive, flush=True)
        seen = alive
    if alive >= want:
        sys.exit(0)
    time.sleep(0.5)
sys.exit(3)
"""


def _log_tails(temp_dir: str, chars: int = 1500) -> str:
    """The start logs and Ray's own error logs of this cluster, for a failure message."""
    root = Path(temp_dir)
    files = sorted(root.glob("ray-start-*.log")) + sorted(root.glob("session_latest/logs/raylet*.err")) + \
        sorted(root.glob("session_latest/logs/raylet*.out")) + sorted(root.glob("session_latest/logs/gcs_server.err"))
    parts = []
    for f in files:
        with contextlib.suppress(OSError):
            parts.append(f"--- {f.relative_to(root)}\n{f.read_text(errors='replace')[-chars:]}")
    return "\n".join(parts)


def _wait_nodes(env: dict[str, str], gcs: str, count: int, timeout_s: float, starters: list[subprocess.Popen]) -> bool:
    """True once ``count`` nodes are alive; False at the deadline or when a node's ``ray start`` exited.

    One driver polls for the whole wait: a driver per poll costs seconds of CPU each on a 2-core
    machine, which is what a joining node needs."""
    probe = subprocess.Popen([sys.executable, "-c", _PROBE, gcs, str(count), str(timeout_s)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + timeout_s + 60  # the driver's own connect time on top
    try:
        while time.monotonic() < deadline:
            if probe.poll() is not None:
                return probe.returncode == 0
            if any(s.poll() is not None for s in starters):
                return False
            time.sleep(0.5)
        return False
    finally:
        if probe.poll() is None:
            probe.kill()
        probe.wait(timeout=30)


def _end_sessions(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, every process in the sessions these nodes were started in."""
    sids = {p.pid for p in procs}
    victims = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(proc.pid) in sids:
                victims.append(proc)
    for proc in victims:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(victims, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def _start_node(i: int, node: dict, is_head: bool, gcs: str, dashboard: bool, dash_port: int, env: dict[str, str],
                temp_dir: str) -> subprocess.Popen:
    cmd = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address", node["ip"],
           "--num-cpus", str(node["num_cpus"]), "--temp-dir", temp_dir]
    # Ray's fixed default ports (the dashboard agent's 52365, metrics, runtime env agent) are
    # taken by the test session's own cluster: each node gets free ones, or its job agent
    # never comes up ("No available agent to submit job").
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                 "--runtime-env-agent-port", "--ray-client-server-port"):
        cmd += [flag, str(free_port())]
    if node.get("resources"):
        cmd += ["--resources", json.dumps(node["resources"])]
    if is_head:
        cmd += ["--head", "--port", gcs.rsplit(":", 1)[1]]
        if dashboard:
            cmd += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port)]
        else:
            cmd += ["--include-dashboard", "false"]
    else:
        cmd += ["--address", gcs]
    log_file = open(Path(temp_dir) / f"ray-start-{i}.log", "a")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)


@contextlib.contextmanager
def local_ray_cluster(nodes: list[dict], *, dashboard: bool = False, timeout_s: float = 120,
                      start_attempts: int = 3) -> Iterator[LocalRayCluster]:
    """``nodes[0]`` is the head. Each node: ``ip`` (a loopback address), ``num_cpus``, optional ``resources``."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths live below it
    head = nodes[0]
    gcs = f"{head['ip']}:{free_port(head['ip'])}"
    dash_port = free_port()
    procs: list[subprocess.Popen] = []
    cluster = LocalRayCluster(gcs_address=gcs, dashboard_url=f"http://127.0.0.1:{dash_port}" if dashboard else None,
                              env=env, temp_dir=temp_dir, procs=procs)
    try:
        for i, node in enumerate(nodes):
            for attempt in range(1, start_attempts + 1):
                procs.append(_start_node(i, node, nodes[0] is node, gcs, dashboard, dash_port, env, temp_dir))
                if _wait_nodes(env, gcs, i + 1, timeout_s, [procs[-1]]):
                    break
                # A node that exited (a port taken between choosing and binding it) or never
                # registered is started again with fresh ports, the head with a fresh GCS port.
                tails = _log_tails(temp_dir)
                if attempt == start_attempts:
                    raise AssertionError(f"local Ray cluster did not reach {i + 1} nodes in {timeout_s:.0f} s "
                                         f"({attempt} attempts):\n{tails}")
                log.warning("node %d (%s) did not join, starting it again:\n%s", i, node["ip"], tails)
                _end_sessions([procs.pop()])
                if i == 0:
                    gcs = cluster.gcs_address = f"{head['ip']}:{free_port(head['ip'])}"
        yield cluster
    finally:
        _end_sessions(procs)
