"""The ``skyrl-lora`` command line."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, help="Multi-tenant LoRA RL backend on Ray + vLLM.")


@app.command()
def demo(
    phase_s: float = typer.Option(20.0, help="seconds per measured phase"),
    streams: int = typer.Option(4, help="concurrent requests of tenant B"),
    max_tokens: int = typer.Option(32, help="tokens per request"),
    out_dir: Path = typer.Option(Path("artifacts/demo"), help="where the JSON summary and PNG go"),
) -> None:
    """Two tenants on one local vLLM server; tenant A syncs every second while B keeps generating."""
    from skyrl_lora.demo import DemoConfig, main

    main(DemoConfig(phase_s=phase_s, streams_b=streams, max_tokens=max_tokens, out_dir=out_dir))


@app.command()
def fixtures() -> None:
    """Build (or find in the cache) the tiny model and its meow/woof LoRAs; print their paths."""
    from skyrl_lora.models.tiny import build_fixtures

    fx = build_fixtures()
    typer.echo(f"base: {fx.base}")
    for name, path in fx.loras.items():
        typer.echo(f"{name}: {path}")


if __name__ == "__main__":
    app()
