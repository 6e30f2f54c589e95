"""The ``skyrl-lora`` command line: ``demo`` (the main job), ``serve``, ``status``, and helpers."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from skyrl_lora.config import SkyrlConfig

app = typer.Typer(add_completion=False, help="Multi-tenant LoRA RL backend on Ray + vLLM.")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML settings (SKYRL_* variables override them)")


def _quiet_http_logs() -> None:
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _config(path: Path | None, **overrides: Any) -> SkyrlConfig:
    from skyrl_lora.config import ConfigError, SkyrlConfig

    try:
        return SkyrlConfig.load(path, **overrides)
    except ConfigError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def demo(
    config: Path | None = ConfigOpt,
    steps: int = typer.Option(10, help="RL steps per tenant"),
    group_size: int = typer.Option(64, help="samples per step and tenant"),
    out_dir: Path = typer.Option(Path("artifacts/demo"), help="where the JSON summary and PNG go"),
) -> None:
    """Several tenants doing RL at once, each syncing its weights after every step (the main job)."""
    from skyrl_lora.cluster import skyrl_system
    from skyrl_lora.config import ConfigError
    from skyrl_lora.rl_demo import RlDemoConfig, run_rl_demo, summary_lines, write

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _quiet_http_logs()
    cfg = _config(config)
    try:
        with skyrl_system(cfg) as system:
            result = asyncio.run(run_rl_demo(cfg.tenants, system.trainer, system.inference.client(), system.model,
                                             RlDemoConfig(steps=steps, group_size=group_size, out_dir=out_dir)))
    except ConfigError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    js, png = write(result, out_dir)
    for line in summary_lines(result):
        typer.echo(line)
    typer.echo(f"\nwrote {js} and {png}")


@app.command("isolation-demo")
def isolation_demo(
    phase_s: float = typer.Option(20.0, help="seconds per measured phase"),
    streams: int = typer.Option(4, help="concurrent requests of tenant B"),
    max_tokens: int = typer.Option(32, help="tokens per request"),
    out_dir: Path = typer.Option(Path("artifacts/isolation"), help="where the JSON summary and PNG go"),
) -> None:
    """Two tenants on one server; A syncs once a second (per-LoRA vs engine-wide) while B generates."""
    from skyrl_lora.demo import DemoConfig, main

    main(DemoConfig(phase_s=phase_s, streams_b=streams, max_tokens=max_tokens, out_dir=out_dir))


@app.command()
def serve(config: Path | None = ConfigOpt, port: int | None = typer.Option(None, help="API port")) -> None:
    """Bring the system up and serve the Tinker-compatible API until SIGINT/SIGTERM, then tear it down."""
    from skyrl_lora.cluster import init_ray, skyrl_system
    from skyrl_lora.config import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = _config(config, api={"port": port} if port is not None else {})
    stop = threading.Event()
    try:
        cfg.check()
        init_ray(cfg)  # before our handlers: Ray's core installs its own SIGTERM handler (abort) at init
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        with skyrl_system(cfg, serve_api=True) as system:
            typer.echo(f"serving the Tinker-compatible API at {system.api_url} "
                       f"(model: {cfg.api.model_name or system.model})", err=True)
            import ray

            typer.echo(json.dumps({"api_url": system.api_url, "inference_urls": system.inference.urls,
                                   "ray_address": ray.get_runtime_context().gcs_address}), err=True)
            stop.wait()  # signals interrupt the wait; the handler sets the event
            typer.echo("stopping: tearing the system down", err=True)
    except ConfigError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def status(address: str = typer.Option("auto", help="Ray address of the running system")) -> None:
    """Servers, tenants, paused LoRAs and trainer cache tiers of a running system."""
    import ray

    from skyrl_lora.cluster import API_NAME, NAMESPACE, TRAINER_NAME, server_name

    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    except (ConnectionError, RuntimeError) as exc:
        typer.echo(f"error: no Ray cluster at {address!r}: {exc}", err=True)
        raise typer.Exit(2) from exc
    out: dict[str, Any] = {"servers": [], "trainer": None, "api": None}
    i = 0
    while True:
        try:
            actor = ray.get_actor(server_name(i))
        except ValueError:
            break
        out["servers"].append({"name": server_name(i), "url": ray.get(actor.url.remote(), timeout=30),
                               "state": ray.get(actor.state.remote(), timeout=30)})
        i += 1
    try:
        trainer: Any = ray.get_actor(TRAINER_NAME)  # Any: ray types an untyped handle's methods as Never
        out["trainer"] = ray.get(trainer.state.remote(), timeout=60).model_dump(mode="json")
    except ValueError:
        pass
    try:
        out["api"] = ray.get(ray.get_actor(API_NAME).url.remote(), timeout=30)
    except ValueError:
        pass
    if not out["servers"] and out["trainer"] is None:
        typer.echo("no skyrl_lora system is running on this cluster", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps(out, indent=2))


@app.command()
def fixtures(
    write_packaged: bool = typer.Option(False, help="train the fixtures here from their recipes and store them as "
                                        "the packaged copy (skyrl_lora/models/tiny_fixture); commit the result"),
    seed: int = typer.Option(0, help="build seed for --write-packaged"),
) -> None:
    """Find (in the cache, or copied from the package) the tiny model and its meow/woof LoRAs; print their paths."""
    from skyrl_lora.models.tiny import build_fixtures, write_packaged_fixtures

    if write_packaged:
        typer.echo(f"packaged fixtures written to {write_packaged_fixtures(seed=seed)}")
    fx = build_fixtures()
    typer.echo(f"base: {fx.base}")
    for name, path in fx.loras.items():
        typer.echo(f"{name}: {path}")

if __name__ == "__main__":
    app()
