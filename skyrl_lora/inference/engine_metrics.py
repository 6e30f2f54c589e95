"""vLLM's own Prometheus counters, scraped from a server's ``/metrics``: what the engine really did.

Benchmarks and the soak compare them with what clients received, e.g. tokens the engine generated
versus tokens delivered (anything more was generated twice), or prefill work caused by continuations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class EngineCounters:
    generation_tokens: float = 0.0
    prompt_tokens: float = 0.0
    prompt_tokens_cached: float = 0.0
    prefill_seconds: float = 0.0
    prefill_requests: float = 0.0
    finished_requests: float = 0.0

    def __sub__(self, other: EngineCounters) -> EngineCounters:
        return EngineCounters(*(a - b for a, b in zip(astuple(self), astuple(other))))

    def __add__(self, other: EngineCounters) -> EngineCounters:
        return EngineCounters(*(a + b for a, b in zip(astuple(self), astuple(other))))


_SAMPLES = {
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:prompt_tokens_cached_total": "prompt_tokens_cached",
    "vllm:request_prefill_time_seconds_sum": "prefill_seconds",
    "vllm:request_prefill_time_seconds_count": "prefill_requests",
    "vllm:request_success_total": "finished_requests",
}


def parse_counters(text: str) -> EngineCounters:
    """Sums each counter over its label sets (models, engines, finish reasons)."""
    totals = dict.fromkeys(_SAMPLES.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = _SAMPLES.get(sample.name)
            if key is not None:
                totals[key] += float(sample.value)
    return EngineCounters(**totals)


async def scrape(urls: Sequence[str], timeout_s: float = 10.0) -> EngineCounters:
    """The counters of every server, added up."""
    total = EngineCounters()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        for url in urls:
            async with http.get(f"{url}/metrics") as resp:
                resp.raise_for_status()
                total = total + parse_counters(await resp.text())
    return total
