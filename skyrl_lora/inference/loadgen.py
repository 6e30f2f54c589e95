"""Load generation and side-by-side throughput measurement, shared by the demo and the benchmarks."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.inference.protocol import SampleOut


@dataclass
class StreamStats:
    """Tokens completed by one tenant's streams, with completion times for a timeline."""

    tenant: str
    tokens: int = 0
    requests: int = 0
    segments: int = 0
    # tokens prefilled again where a cut request went on (its prompt plus the tokens it had): the
    # work an ``abort`` sync costs beyond the flip; none of them is generated twice
    reprefill_tokens: int = 0
    events: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, tokens)
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


async def run_streams(client: RemoteInferenceClient, tenant: str, prompt: Sequence[int], *, streams: int,
                      max_tokens: int, duration_s: float, t0: float | None = None) -> StreamStats:
    """Keep ``streams`` greedy requests of one tenant in flight for ``duration_s``; count finished tokens.

    Only requests that finish inside the window count, and the window ends when the last of them
    returns, so a frozen tenant shows up as lost throughput rather than as a late burst.
    """
    stats = StreamStats(tenant=tenant)
    start = time.perf_counter()
    origin = start if t0 is None else t0
    deadline = start + duration_s
    params = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}

    async def one_stream() -> None:
        while time.perf_counter() < deadline:
            (s,) = await client.sample_with_retry(prompt, params, tenant)
            stats.tokens += len(s.token_ids)
            stats.requests += 1
            stats.segments += 1 + s.continuations
            stats.reprefill_tokens += reprefill_tokens(len(prompt), s)
            stats.events.append((time.perf_counter() - origin, len(s.token_ids)))

    await asyncio.gather(*(one_stream() for _ in range(streams)))
    stats.seconds = time.perf_counter() - start
    return stats


def reprefill_tokens(prompt_len: int, sample: SampleOut) -> int:
    """Tokens the engine read again to continue ``sample`` after aborts: per continuation, the prompt
    and the tokens generated before it. A continuation starts where a version does; an in-place
    flip changes versions too, with no request cut, so only the last ``continuations`` starts count."""
    if not sample.continuations:
        return 0
    starts = sorted({v.start for v in sample.version_spans})[1:]
    return sum(prompt_len + start for start in starts[-sample.continuations:])


async def every(period_s: float, duration_s: float, action: Callable[[int], Awaitable[float]]) -> list[float]:
    """Run ``action(i)`` once per period for the duration; returns what each call returned (its latency)."""
    out: list[float] = []
    deadline = time.perf_counter() + duration_s
    i = 0
    while True:
        next_at = time.perf_counter() + period_s
        if next_at > deadline:
            break
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        out.append(await action(i))
        i += 1
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def timed(coro: Awaitable[object]) -> float:
    t = time.perf_counter()
    await coro
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# sync strategies, side by side: each takes the sync index and returns its wall time


def sync_strategy(client: RemoteInferenceClient, tenant: str, paths: Sequence[str],
                  kind: str) -> Callable[[int], Awaitable[float]]:
    """``per-lora``: our targeted flip; ``inplace``: in-place load, no pause; ``engine-wide``: vLLM's
    engine-wide pause around an in-place load (what a whole-engine weight sync costs everyone)."""

    async def per_lora(i: int) -> float:
        return await timed(client.update_lora(tenant, paths[i % len(paths)], mode="abort"))

    async def inplace(i: int) -> float:
        return await timed(client.update_lora(tenant, paths[i % len(paths)], mode="inplace"))

    async def engine_wide(i: int) -> float:
        async def step() -> None:
            await client.pause_generation(None, lease_s=30)
            try:
                await client.load_lora_adapter(tenant, paths[i % len(paths)], load_inplace=True, mode="inplace")
            finally:
                await client.resume_generation(None)
        return await timed(step())

    strategies = {"per-lora": per_lora, "inplace": inplace, "engine-wide": engine_wide}
    if kind not in strategies:
        raise ValueError(f"kind must be one of {sorted(strategies)}, got {kind!r}")
    return strategies[kind]


@dataclass
class PhaseMeasurement:
    name: str
    b: StreamStats
    a: StreamStats | None
    sync_latencies_s: list[float]


async def measure_phase(client: RemoteInferenceClient, prompt: Sequence[int], *, name: str, tenant_b: str,
                        tenant_a: str | None, sync: Callable[[int], Awaitable[float]] | None, duration_s: float,
                        streams_b: int, streams_a: int, max_tokens: int, sync_period_s: float = 1.0,
                        t0: float | None = None) -> PhaseMeasurement:
    """B generates for the duration; A (if given) generates beside it; ``sync`` runs once a period."""
    jobs: list[Awaitable[object]] = [run_streams(client, tenant_b, prompt, streams=streams_b, max_tokens=max_tokens,
                                                 duration_s=duration_s, t0=t0)]
    if tenant_a is not None:
        jobs.append(run_streams(client, tenant_a, prompt, streams=streams_a, max_tokens=max_tokens,
                                duration_s=duration_s, t0=t0))
    if sync is not None:
        jobs.append(every(sync_period_s, duration_s, sync))
    results = await asyncio.gather(*jobs)
    return PhaseMeasurement(name=name, b=results[0], a=results[1] if tenant_a is not None else None,  # type: ignore[arg-type]
                            sync_latencies_s=results[2] if sync is not None else [])  # type: ignore[arg-type]


@dataclass
class GapStats:
    """Gaps between consecutive streamed tokens of one watching stream: an engine stall shows here
    first, as one long gap, while throughput over a window barely moves."""

    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0

    def quantile(self, q: float) -> float:
        if not self.gaps_s:
            return float("nan")
        ordered = sorted(self.gaps_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def max_s(self) -> float:
        return max(self.gaps_s, default=float("nan"))


async def watch_gaps(url: str, model: str, prompt: str, *, duration_s: float, max_tokens: int = 128,
                     token: str | None = None, stop: asyncio.Event | None = None) -> GapStats:
    """Stream completions of ``model`` through vLLM's ``/v1/completions`` (our gate included) one after
    another for ``duration_s``, recording the time between consecutive token chunks. The first gap of
    each request (its prefill) is not counted."""
    import aiohttp
    import orjson

    stats = GapStats()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    deadline = time.perf_counter() + duration_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=duration_s + 120)) as http:
        while time.perf_counter() < deadline and not (stop is not None and stop.is_set()):
            last: float | None = None
            async with http.post(url + "/v1/completions", json=body, headers=headers) as resp:
                resp.raise_for_status()
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    chunk = orjson.loads(line[6:])
                    choice = (chunk.get("choices") or [{}])[0]
                    arrived = len(choice.get("token_ids") or []) or int(bool(choice.get("text")))
                    if not arrived:
                        continue
                    now = time.perf_counter()
                    if last is not None:
                        stats.gaps_s.append(now - last)
                    last = now
                    stats.tokens += arrived
    return stats
