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


def _wait_nodes(env: dict[str, str], gcs: str, count: int, timeout_s: float) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", probe, gcs], env=env, capture_output=True, text=True, timeout=120)
        last = out.stdout.strip() + out.stderr[-2000:]
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1)
    raise AssertionError(f"local Ray cluster did not reach {count} nodes in {timeout_s:.0f} s: {last}")


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


@contextlib.contextmanager
def local_ray_cluster(nodes: list[dict], *, dashboard: bool = False, timeout_s: float = 180) -> Iterator[LocalRayCluster]:
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
            cmd = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address", node["ip"],
                   "--num-cpus", str(node["num_cpus"]), "--temp-dir", temp_dir]
            # Ray's fixed default ports (the dashboard agent's 52365, metrics, runtime env agent) are
            # taken by the test session's own cluster: each node gets free ones, or its job agent
            # never comes up ("No available agent to submit job").
            for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                         "--runtime-env-agent-port", "--ray-client-server-port"):
                cmd += [flag, str(free_port())]
            if node.get("resources"):
                import json

                cmd += ["--resources", json.dumps(node["resources"])]
            if i == 0:
                cmd += ["--head", "--port", gcs.rsplit(":", 1)[1]]
                if dashboard:
                    cmd += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                            str(dash_port)]
                else:
                    cmd += ["--include-dashboard", "false"]
            else:
                cmd += ["--address", gcs]
            log = open(Path(temp_dir) / f"ray-start-{i}.log", "w")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            if i == 0:
                _wait_nodes(env, gcs, 1, timeout_s)
        _wait_nodes(env, gcs, len(nodes), timeout_s)
        yield cluster
    finally:
        _end_sessions(procs)
