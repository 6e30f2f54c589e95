"""SkyrlConfig is made of the components' own settings: nested sections load from YAML and SKYRL_*__*
variables, shared values reach every component from one place, and the servers' token travels as an
argument, never through the environment. Pure: nothing here starts Ray or vLLM."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from skyrl_lora.api.settings import ApiOptions, ApiSettings
from skyrl_lora.cluster import Deployment, InferenceCluster, api_settings, server_config, trainer_config
from skyrl_lora.config import ApiSection, ConfigError, ServerSection, SkyrlConfig, TrainerSection
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.inference.server import ServerConfig, ServerSettings
from skyrl_lora.training.config import TrainerConfig, TrainerSettings

PACKAGE = Path(__file__).resolve().parents[1] / "skyrl_lora"
SHARED = {"base_model", "model", "max_lora_rank", "max_model_len", "max_context_length", "inference_token",
          "control_token"}

YAML = """\
base_model: /models/m
max_lora_rank: 48
max_model_len: 2048
data_dir: /tmp/skyrl-compose
server:
  count: 2
  gpus: 0.5
  max_loras: 12
  gpu_memory_utilization: 0.7
trainer:
  gpus: 0.25
  resident_budget_bytes: 1234
api:
  model_name: org/m
  port: 8123
  api_keys: {"tml-compose-0001": "team-a"}
"""


@pytest.fixture(autouse=True)
def _no_skyrl_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the machine's environment holds, these tests see only the variables they set."""
    for key in list(os.environ):
        if key.startswith("SKYRL_"):
            monkeypatch.delenv(key)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "skyrl.yaml"
    path.write_text(YAML)
    return path


def _deployment() -> Deployment:
    return Deployment(model="/models/m", token="tok-123", data_dir=Path("/tmp/skyrl-compose"),
                      publish_root=Path("/dev/shm/skyrl_lora/x"))


def test_yaml_with_nested_sections_loads(config_file: Path) -> None:
    config = SkyrlConfig.load(config_file)
    assert (config.server.count, config.server.gpus, config.server.max_loras) == (2, 0.5, 12)
    assert config.server.max_cpu_loras == 32  # a section's defaults stand beside the file's keys
    assert (config.trainer.gpus, config.trainer.resident_budget_bytes) == (0.25, 1234)
    assert (config.api.model_name, config.api.port) == ("org/m", 8123)
    assert config.api.api_keys == {"tml-compose-0001": "team-a"}
    assert (config.max_lora_rank, config.max_model_len) == (48, 2048)


def test_an_env_variable_overrides_the_file_key_by_key(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYRL_SERVER__MAX_LORAS", "4")
    monkeypatch.setenv("SKYRL_API__API_KEYS", '{"tml-from-the-env-1": "team-b"}')
    monkeypatch.setenv("SKYRL_MAX_MODEL_LEN", "512")
    config = SkyrlConfig.load(config_file)
    assert config.server.max_loras == 4
    assert (config.server.count, config.server.gpu_memory_utilization) == (2, 0.7)  # the file's other keys stand
    assert config.api.api_keys == {"tml-from-the-env-1": "team-b"} and config.api.port == 8123
    assert config.max_model_len == 512
    # explicit overrides win over both, again key by key inside a section; a dict-valued setting is replaced
    config = SkyrlConfig.load(config_file, server={"max_loras": 6}, max_lora_rank=64,
                              api={"api_keys": {"tml-from-overrides": "c"}})
    assert (config.server.max_loras, config.server.count, config.max_lora_rank) == (6, 2, 64)
    assert config.api.api_keys == {"tml-from-overrides": "c"} and config.api.port == 8123


def test_an_unknown_nested_key_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  max_lora: 4\n")
    with pytest.raises(ConfigError, match=r"server\.max_lora\b"):
        SkyrlConfig.load(bad)
    monkeypatch.setenv("SKYRL_TRAINER__BUDGET", "1")
    with pytest.raises(ConfigError, match=r"trainer\.budget"):
        SkyrlConfig.load(None)


def test_a_setting_of_the_flat_layout_is_refused_with_its_new_place(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("gpus_per_server: 1\n")
    with pytest.raises(ConfigError, match=r"'gpus_per_server' is now 'server\.gpus'"):
        SkyrlConfig.load(old)
    monkeypatch.setenv("SKYRL_API_KEYS", '{"tml-old-layout-01": "x"}')
    with pytest.raises(ConfigError, match="SKYRL_API_KEYS is now SKYRL_API__API_KEYS"):
        SkyrlConfig.load(None)
    monkeypatch.delenv("SKYRL_API_KEYS")
    monkeypatch.setenv("SKYRL_API_FUTURE_RETENTION_S", "60")  # ApiSettings' own variable, before it read none
    with pytest.raises(ConfigError, match="SKYRL_API__FUTURE_RETENTION_S"):
        SkyrlConfig.load(None)


def test_validation_still_holds() -> None:
    with pytest.raises(ConfigError, match="max_lora_rank"):
        SkyrlConfig.load(None, max_lora_rank=4)  # the default tenants have rank 8
    with pytest.raises(ConfigError, match=r"server\.max_loras"):
        SkyrlConfig.load(None, server={"max_loras": 0})
    with pytest.raises(ConfigError) as err:
        SkyrlConfig.load(None, server={"count": 2, "gpus": 1}).check({"CPU": 4.0})
    assert err.value.field == "server.gpus"
    with pytest.raises(ConfigError) as err:
        SkyrlConfig.load(None, trainer={"base_weights": "shared"})._check_sharing()
    assert err.value.field == "trainer.base_weights" and "CPU" in err.value.message


def test_no_section_can_hold_a_shared_value() -> None:
    """A shared value has one field, at the top: a section with its own copy could disagree with it."""
    for section in (ServerSection, TrainerSection, ApiSection):
        assert not set(section.model_fields) & SHARED, section
    assert {"base_model", "max_lora_rank", "max_model_len", "inference_token"} <= set(SkyrlConfig.model_fields)


def test_shared_values_reach_every_component_from_one_place(config_file: Path) -> None:
    config = SkyrlConfig.load(config_file)
    deployment = _deployment()
    server = server_config(config, deployment)
    trainer = trainer_config(config, deployment, ["http://a:1", "http://b:2"], serve_api=True)
    api = api_settings(config, deployment)
    assert isinstance(server, ServerConfig) and isinstance(trainer, TrainerConfig) and isinstance(api, ApiSettings)
    assert server.max_lora_rank == trainer.max_lora_rank == config.max_lora_rank == 48
    assert server.max_model_len == api.max_context_length == config.max_model_len == 2048
    assert server.model == trainer.base_model == api.base_model == deployment.model
    assert server.control_token == trainer.inference_token == api.inference_token == deployment.token
    # the deployment's own values
    assert server.state_dir == "/tmp/skyrl-compose/servers"
    assert server.adapter_roots == (str(Path("/tmp/skyrl-compose").resolve()), "/dev/shm/skyrl_lora/x")
    assert trainer.inference_urls == ("http://a:1", "http://b:2") and trainer.share_from == "skyrl-vllm-0"
    assert (trainer.state_dir, trainer.publish_root) == (Path("/tmp/skyrl-compose/trainer"), deployment.publish_root)
    assert api.data_dir == Path("/tmp/skyrl-compose/api")
    assert trainer.keep_sampler_versions == 1_000_000
    assert trainer_config(config, deployment, [], serve_api=False).keep_sampler_versions == 4
    # every setting of a section is handed on as it is, none copied by hand
    for name in ServerSettings.model_fields:
        assert getattr(server, name) == getattr(config.server, name), name
    for name in TrainerSettings.model_fields:
        assert getattr(trainer, name) == getattr(config.trainer, name), name
    for name in ApiOptions.model_fields:
        assert getattr(api, name) == getattr(config.api, name), name


def test_the_derived_defaults_are_the_deployments_of_before() -> None:
    """The flat layout's defaults: 8 GPU slots, 32 CPU ones, 60 % of the GPU; 'own' base weights; port 8000."""
    config = SkyrlConfig.load(None, ray_address="local")
    server = server_config(config, _deployment())
    assert (server.max_loras, server.max_cpu_loras, server.gpu_memory_utilization) == (8, 32, 0.6)
    assert (server.max_lora_rank, server.max_model_len) == (32, 1024)
    assert server.host == "127.0.0.1"  # a Ray of this process's own: nothing else could reach another address
    assert server_config(SkyrlConfig.load(None), _deployment()).host is None  # the node's IP, as Ray knows it
    assert server_config(SkyrlConfig.load(None, server={"host": "0.0.0.0"}), _deployment()).host == "0.0.0.0"
    trainer = trainer_config(config, _deployment(), [], serve_api=False)
    assert (trainer.base_weights, trainer.resident_budget_bytes, trainer.cpu_budget_bytes) == ("own", 512 << 20,
                                                                                               2048 << 20)
    assert (config.server.count, config.server.gpus, config.trainer.gpus, config.api.port) == (1, 0, 0, 8000)
    # sampler files in the servers' dtype (vLLM casts to it anyway); float32 where the servers' is 'auto'
    assert trainer.sampler_dtype == "bfloat16"
    auto = SkyrlConfig.load(None, ray_address="local", server={"dtype": "auto"})
    assert trainer_config(auto, _deployment(), [], serve_api=False).sampler_dtype == "float32"


def test_the_token_is_an_argument_never_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    tree = ast.parse((PACKAGE / "cluster.py").read_text())
    writes = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Subscript)
              and isinstance(node.ctx, ast.Store) and "environ" in ast.unparse(node.value)]
    assert not writes, f"cluster.py writes os.environ at lines {writes}"
    readers = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "SKYRL_INFERENCE_TOKEN" in p.read_text()]
    assert not readers
    monkeypatch.setenv("SKYRL_INFERENCE_TOKEN", "from-the-environment")
    assert RemoteInferenceClient("http://127.0.0.1:9")._auth == {}  # the client ignores it
    client = InferenceCluster(urls=["http://127.0.0.1:9"], token="deployment-token").client()
    assert client._auth == {"Authorization": "Bearer deployment-token"} and client.urls == ["http://127.0.0.1:9"]
