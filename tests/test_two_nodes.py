"""Servers reachable from other nodes: a two-node Ray cluster on this machine (the second node on
127.0.0.2), a server placed on the second node binds that node's address and announces it, a client
on the head reaches it there, and a new version published from the head reaches it as sent files
(issue 16: publication across nodes, no shared filesystem)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .local_ray import local_ray_cluster

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[1]


def test_server_on_the_second_node_is_reached_through_the_address_it_announces(tiny) -> None:
    nodes = [{"ip": "127.0.0.1", "num_cpus": 1}, {"ip": "127.0.0.2", "num_cpus": 2, "resources": {"second": 1}}]
    with local_ray_cluster(nodes) as cluster:
        run = cluster.python("-m", "tests.two_node_driver", cwd=ROOT, timeout=900)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and lines, (run.stdout[-3000:], run.stderr[-5000:])
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert out["url"].startswith("http://127.0.0.2:"), out  # the second node's address, not the head's
    assert out["reachable_at_announced"] and not out["reachable_at_head_loopback"], out
    assert out["tokens"] == [out["woof"]] * 4, out  # and it serves the tenant there
    # a version published from the head reaches it without a shared filesystem: the files are sent
    assert out["server_node_differs"] and out["published_version"] == 2, out
    assert out["served_from_upload"] and out["published_tokens_meow"], out
    assert out["upload_freed"], out  # unloading frees the server's copy
