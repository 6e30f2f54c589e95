"""Configuration checks, ray_cluster.yaml against Ray's schema, `serve` start/health/SIGTERM, the RL demo."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import ray
import yaml

from skyrl_lora.config import ConfigError, SkyrlConfig

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_ray_cluster_yaml_validates_against_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    ports = {p["FromPort"] for p in cfg["provider"]["security_group"]["IpPermissions"]}
    assert {8000, 8265} <= ports
    assert any("[gpu]" in c for c in cfg["setup_commands"])
    # the job-submission port is open to a network: every node runs Ray with token authentication,
    # and the token reaches every node
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ") for c in starts), starts
    assert "/home/ubuntu/.ray/auth_token" in cfg["file_mounts"]
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu_worker"]["max_workers"] = "many"
    with pytest.raises(Exception, match="many"):
        validate_config(prepare_config(broken))


def test_bad_configuration_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        SkyrlConfig.load(None, base_model=str(tmp_path / "missing")).check()
    assert err.value.field == "base_model" and "config.json" in err.value.message
    with pytest.raises(ConfigError) as err:
        SkyrlConfig.load(None, max_lora_rank=4)
    assert "max_lora_rank" in err.value.message
    with pytest.raises(ConfigError) as err:
        SkyrlConfig.load(None, server={"count": 2, "gpus": 1}).check({"CPU": 4.0})
    assert err.value.field == "server.gpus" and "cluster has 0" in err.value.message
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("server:\n  max_loras: -3\n")
    with pytest.raises(ConfigError) as err:
        SkyrlConfig.load(bad_yaml)
    assert "server.max_loras" in err.value.message
    # through the command line: exit 2 with the field named, quickly, and nothing started
    t0 = time.monotonic()
    run = subprocess.run([str(BIN / "skyrl-lora"), "serve"], env={**os.environ, "SKYRL_BASE_MODEL": str(tmp_path / "nope")},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "base_model" in run.stderr, run.stderr[-2000:]
    assert time.monotonic() - t0 < 60


def test_more_gpus_than_the_cluster_has_fails_before_any_actor(tiny, ray_local) -> None:
    from skyrl_lora.cluster import server_name, skyrl_system

    config = SkyrlConfig.load(None, base_model=str(tiny.base), server={"gpus": 8}, data_dir="/tmp/skyrl-gpu-check")
    with pytest.raises(ConfigError) as err:
        with skyrl_system(config):
            pass
    assert err.value.field == "server.gpus"
    with pytest.raises(ValueError):
        ray.get_actor(server_name(0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines_until(proc: subprocess.Popen, marker: str):
    """Lines of the process's output up to and including the first one containing ``marker``."""
    for line in proc.stdout:
        if marker in line:
            yield line
            return


def test_serve_answers_health_and_stops_cleanly_on_sigterm(tiny, tmp_path: Path) -> None:
    port = _free_port()
    key = "tml-serve-test-0000001"
    env = {**os.environ, "SKYRL_RAY_ADDRESS": "local", "SKYRL_DATA_DIR": str(tmp_path / "data"),
           "SKYRL_BASE_MODEL": str(tiny.base), "SKYRL_API__API_KEYS": json.dumps({key: "tester"}),
           "RAY_AUTH_MODE": "disabled", "SKYRL_MAX_MODEL_LEN": "512"}
    proc = subprocess.Popen([str(BIN / "skyrl-lora"), "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            try:
                if httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve did not answer /healthz in time"
            time.sleep(0.5)
        caps = httpx.get(f"{url}/api/v1/get_server_capabilities", headers={"X-API-Key": key}, timeout=10).json()
        assert caps["supported_models"][0]["model_name"] == str(tiny.base)
        # `status` against the running system: its servers, the trainer's tiers, the API
        line = next(ln for ln in _lines_until(proc, '"ray_address"'))
        address = json.loads(line[line.index("{"):])["ray_address"]
        st = subprocess.run([str(BIN / "skyrl-lora"), "status", "--address", address], env=env, capture_output=True,
                            text=True, timeout=120)
        assert st.returncode == 0, st.stderr[-2000:]
        report = json.loads(st.stdout)
        assert len(report["servers"]) == 1 and report["servers"][0]["state"]["loras"] == []
        assert {t["tier"] for t in report["trainer"]["tiers"]} == {"resident", "cpu", "disk"}
        assert report["api"] == url
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(family) > 3  # Ray's processes, the vLLM engine, the trainer, the API
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-4000:]
        deadline = time.monotonic() + 60
        while alive := [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]:
            assert time.monotonic() < deadline, f"stray processes after SIGTERM: {alive}"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.vllm
def test_rl_demo_runs_end_to_end(tiny, vllm_server, tmp_path: Path) -> None:
    from skyrl_lora.config import DEFAULT_TENANTS
    from skyrl_lora.inference.client import RemoteInferenceClient
    from skyrl_lora.rl_demo import RlDemoConfig, run_rl_demo, summary_lines, write
    from skyrl_lora.training.actor import start_trainer_actor
    from skyrl_lora.training.config import TrainerConfig

    trainer = start_trainer_actor(TrainerConfig(base_model=str(tiny.base), state_dir=tmp_path / "t",
                                                sampler_root=tmp_path / "a", inference_urls=(vllm_server.url,),
                                                max_lora_rank=16, num_threads=1), num_gpus=0)
    try:
        t0 = time.monotonic()
        demo = RlDemoConfig(steps=3, group_size=32, window_s=1.5, window_pairs=3, out_dir=tmp_path)
        result = asyncio.run(run_rl_demo(DEFAULT_TENANTS, trainer, RemoteInferenceClient(vllm_server.url),
                                         str(tiny.base), demo))
        elapsed = time.monotonic() - t0
    finally:
        ray.kill(trainer)
    assert elapsed < 240
    for t in DEFAULT_TENANTS:
        run = result["tenants"][t.name]
        assert len(run["reward_per_step"]) == 3 and run["syncs"] == 3
        iso = result["isolation"][t.name]
        assert iso["pairs"] == 2 and iso["tokens_per_s_ratio"] > 0  # measured while each other tenant synced
    assert sum(w["syncs"] for w in result["isolation_windows"]) >= 3
    js, png = write(result, tmp_path)
    assert json.loads(js.read_text())["tenants"].keys() == {t.name for t in DEFAULT_TENANTS}
    assert png.stat().st_size > 10_000
    text = "\n".join(summary_lines(result))
    assert all(t.name in text for t in DEFAULT_TENANTS)
