"""``save_weights_for_sampler`` -> first token on the new version, at production size.

An 8B-shaped Llama (``--load-format dummy``, CUDA graphs) serves ``--tenants`` rank-``--rank``
tenants; a trainer on the same GPU whose base is views of the server's weights (the colocated
trainer) trains tenant ``trainee`` and publishes each new version with ``save_weights_for_sampler``
(written to shared memory, staged and flipped on the server). Per publication the parts are timed
where they happen: the export, the sync (stage everywhere, then flip), and a one-token request for
the new version sent when the call returns (what a caller sees), the same request again (the first
token's own cost), and when the durable copy is on disk (written after the call returns). Windows
(``WINDOWS``): ``idle`` (no one else sampling), ``inflight`` (the trainee's own ``--streams`` streamed
requests in flight: with an armed flip the worker names each request's first token on the new
version, and its arrival here is timed, one clock for every process of the host) and ``loaded``
(every other tenant keeps ``--streams`` requests in flight); ``-addlora``: armed flips off (the flip
is the engine's add_lora round trip), side by side in the same run. Each publication is also lined
up hop by hop (``HOPS``: the call's dispatch to the trainer, its export, the request to the server,
the server's checks, the command to the worker, the worker's copy up to arming, the notice back,
the commit, the reply, the call's return) from the stamps the trainer, server and worker leave.

    python -m bench.publish_latency --num-gpus 1 --tenants 4 --streams 8 --publishes 8   # H200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import common

logger = logging.getLogger("bench.publish_latency")
SERVER = "skyrl-bench-publish-latency"
TRAINEE = "trainee"
# idle: nobody else samples; inflight: the trainee keeps --streams requests of its own in flight (the
# first token each makes on the new version is timed exactly, where the worker armed the flip);
# loaded: every other tenant keeps --streams requests in flight. "-addlora": the same with armed
# flips off (the flip is the engine's add_lora round trip), side by side in the same run.
WINDOWS = ("idle", "inflight", "loaded", "idle-addlora", "loaded-addlora")


@dataclass
class TokenStream:
    """One streamed completion: its id and each output token's arrival (``time.monotonic``)."""

    id: str | None = None
    arrivals: list[float] = field(default_factory=list)


async def _stream_tokens(session: Any, url: str, prompt_ids: list[int], max_tokens: int,
                         out: list[TokenStream]) -> None:
    """Streamed completions of the trainee back to back (vLLM's /v1/completions: its usage on every
    chunk counts the tokens, so tokens merged into one chunk are each timed at its arrival)."""
    body = {"model": TRAINEE, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    while True:
        stream = TokenStream()
        out.append(stream)
        async with session.post(url + "/v1/completions", json=body) as resp:
            resp.raise_for_status()
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                now = time.monotonic()
                chunk = json.loads(line[len(b"data: "):])
                stream.id = chunk.get("id") or stream.id
                usage = chunk.get("usage") or {}
                count = int(usage.get("completion_tokens", len(stream.arrivals) + bool(chunk.get("choices"))))
                stream.arrivals.extend([now] * (count - len(stream.arrivals)))


async def _applied_flip(server: Any, path: str, timeout_s: float) -> dict[str, Any] | None:
    """The worker's log entry of the armed flip of ``path`` once applied without error (each version
    has its own path; the log keeps the last ``FLIP_LOG_KEPT``), or None at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        log = await server.flip_log.remote()
        entry = next((e for e in reversed(log) if e["lora_path"] == path and e.get("error") is None), None)
        if entry is not None or time.monotonic() > deadline:
            return entry
        await asyncio.sleep(0.002)


async def _first_new_token(server: Any, path: str, streams: list[TokenStream], prompt_len: int, t0: float,
                           timeout_s: float = 10.0) -> dict[str, Any]:
    """The armed flip of ``path`` (the version's own path) and when the first token the new version
    made reached a stream here: ms after ``t0``; or, under ``note``, why not (no flip applied, a flip
    logged without the step's token positions, no stream of the requests it names)."""
    deadline = time.monotonic() + timeout_s
    entry = await _applied_flip(server, path, timeout_s)
    if entry is None:
        return {"note": "no armed flip was applied"}
    out: dict[str, Any] = {"armed_after_ms": 1e3 * (entry["armed_at"] - t0),
                           "applied_after_ms": 1e3 * (entry["applied_at"] - t0)}
    if not entry.get("made_positions"):
        return {**out, "note": f"the worker names no positions: {entry.get('made_positions')!r}"}
    arrivals: list[float] = []
    for rid, position in entry["made_positions"].items():
        stream = next((s for s in streams if s.id and rid.startswith(s.id)), None)
        if stream is None:
            continue
        index = max(0, position - prompt_len)  # the output token that step made
        while len(stream.arrivals) <= index and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        if len(stream.arrivals) > index:
            arrivals.append(stream.arrivals[index])
    if not arrivals:
        ids = sorted(s.id or "" for s in streams)[-3:]
        return {**out, "note": f"no stream here made {sorted(entry['made_positions'])[:3]} (streams: {ids})"}
    return {**out, "inflight_first_new_token_ms": 1e3 * (min(arrivals) - t0)}


# a publication's hops end to end, each (name, from, to) over the stamps of ``_stamps``
HOPS = (("dispatch", "t0", "called"), ("export", "called", "exported"), ("to_server", "exported", "received"),
        ("checks", "received", "checked"), ("to_worker", "checked", "worker_received"),
        ("worker_handoff", "worker_received", "worker_started"), ("worker_copy", "worker_started", "armed"),
        ("notice", "armed", "staged"), ("commit", "staged", "flipped"),
        ("reply", "flipped", "synced"), ("return", "synced", "returned"))


def _stamps(t0: float, returned: float, saved: Any, flip: dict[str, Any] | None) -> dict[str, float]:
    """Every stamp a publication left (``time.monotonic``: the bench, trainer, server and worker share
    the host's clock): the call, the trainer's, the server's (``SyncTimeline``) and the worker's."""
    stamps = {"t0": t0, "returned": returned}
    timeline = saved.timeline
    if timeline is not None:
        stamps.update(called=timeline.called, exported=timeline.exported, synced=timeline.synced)
        if timeline.server is not None:
            stamps.update({k: v for k, v in timeline.server.model_dump().items() if v is not None})
    if flip is not None:
        stamps.update(worker_received=flip["received_at"], armed=flip["armed_at"], applied=flip["applied_at"])
        if flip.get("started_at") is not None:
            stamps["worker_started"] = flip["started_at"]
    return stamps


def _export_parts_ms(saved: Any) -> dict[str, float]:
    """The export hop's parts (``PublishTimeline.export_parts``), each from the end of the one before
    (the first from the call's start on the trainer, ``to_loop`` from the last to the actor's loop)."""
    timeline = saved.timeline
    if timeline is None or not timeline.export_parts:
        return {}
    out, before = {}, timeline.called
    for name, at in [*timeline.export_parts.items(), ("to_loop", timeline.exported)]:
        out[f"export_{name}_ms"] = 1e3 * (at - before)
        before = at
    return out


def _hops_ms(stamps: dict[str, float]) -> dict[str, float]:
    """Each hop of ``HOPS`` whose two stamps are there, in ms."""
    return {f"hop_{name}_ms": 1e3 * (stamps[b] - stamps[a]) for name, a, b in HOPS if a in stamps and b in stamps}


def _gaps_ms(streams: list[TokenStream], since: float) -> list[float]:
    return [1e3 * (b - a) for s in streams for a, b in zip(s.arrivals, s.arrivals[1:]) if a >= since]


async def _publishes(client: Any, trainer: Any, server: Any, prompt_ids: list[int], datum: Any,
                     count: int, streams: list[TokenStream] | None) -> list[dict[str, Any]]:
    """Per publication: its parts where they happen, what a caller that awaits the call sees (the
    call's return, then a one-token request), the same request once more (the first token's own
    cost, no publication in it), and when the durable copy was written (after the call returns).
    With ``streams`` (the trainee's own, in flight) also when the first token the new version made
    reached one of them (armed flips: the worker names that token)."""
    from skyrl_lora.training.protocol import AdamParams

    one_token = {"max_tokens": 1, "temperature": 0.0}
    out = []
    for i in range(count):
        await trainer.forward_backward.remote(TRAINEE, [datum])
        await trainer.optim_step.remote(TRAINEE, AdamParams(learning_rate=1e-4))
        before = await server.stage_timings.remote()
        t0 = time.monotonic()
        saved = await trainer.save_weights_for_sampler.remote(TRAINEE, f"v{i}")
        returned_at = time.monotonic()
        returned = returned_at - t0
        path = str(Path(saved.path).resolve())  # what the worker logs (the server resolves it)
        inflight = await _first_new_token(server, path, streams, len(prompt_ids), t0) if streams is not None else {}
        after = await server.stage_timings.remote()
        t1 = time.monotonic()
        await client.sample(prompt_ids, one_token, TRAINEE)
        first = time.monotonic() - t1
        t2 = time.monotonic()
        await client.sample(prompt_ids, one_token, TRAINEE)
        again = time.monotonic() - t2
        await trainer.durable.remote(saved.path)
        durable = time.monotonic() - t0
        # an armed flip is applied at the next step or adapter call: the requests above made one
        flip = await _applied_flip(server, path, 0.0)
        out.append({"export_ms": 1e3 * saved.export_s, "sync_ms": 1e3 * saved.sync_s,
                    # inside the sync: the server's check and staging, and the flip's add_lora round trip
                    "staging_ms": 1e3 * (saved.staging_s or 0.0), "flip_ms": 1e3 * (saved.flip_s or 0.0),
                    # the new version serves export + sync after the call began (armed: from the next step)
                    "served_after_ms": 1e3 * (saved.export_s + saved.sync_s),
                    "call_returned_ms": 1e3 * returned, "first_token_ms": 1e3 * first,
                    "save_to_first_token_ms": 1e3 * (returned + first),
                    "token_again_ms": 1e3 * again, "durable_after_ms": 1e3 * durable,
                    **{k: v for k, v in inflight.items() if k != "note"},
                    **_hops_ms(_stamps(t0, returned_at, saved, flip)), **_export_parts_ms(saved),
                    "notes": [inflight["note"]] if "note" in inflight else [],
                    # the worker's own time for what it did (gpu_copy, prebuilt, load, flip), ms
                    "worker": {k: sum(v[len(before.get(k, [])):]) for k, v in after.items()
                               if len(v) > len(before.get(k, []))}})
    return out


def _window(name: str, r: int, pubs: list[dict[str, Any]], gaps: list[float]) -> dict[str, Any]:
    keys = sorted({k for p in pubs for k in p if k not in ("worker", "notes")})
    w: dict[str, Any] = {"window": name, "round": r, "publishes": pubs}
    for k in keys:
        values = [p[k] for p in pubs if k in p]
        w[f"{k}_p50"], w[f"{k}_max"] = statistics.median(values), max(values)
        if k == "inflight_first_new_token_ms":
            w["inflight_first_new_token_ms_p90"] = statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]
            w["inflight_measured"] = len(values)
    if gaps:  # the trainee's streams' token gaps: one engine step and its delivery
        w["stream_gap_ms_p50"], w["stream_gap_ms_p90"] = statistics.median(gaps), statistics.quantiles(gaps, n=10)[-1]
    return w


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp
    from transformers import AutoTokenizer

    from skyrl_lora.inference.client import RemoteInferenceClient
    from skyrl_lora.inference.loadgen import run_streams
    from skyrl_lora.models.tiny import build_fixtures
    from skyrl_lora.training.protocol import LoraSpec

    tenants = [f"t{i}" for i in range(args.tenants)]
    pair = common.start_colocated(args, SERVER, tenants, shape=args.shape, publish=True,
                                  publish_images=args.publish_images, slot_builders=args.slot_builders,
                                  stage_channel=args.stage_channel, sync_mode=args.sync_mode)
    trainer = pair.trainer
    client = RemoteInferenceClient(pair.url)
    tok = AutoTokenizer.from_pretrained(build_fixtures().base)
    prompt_ids = tok("def handle(request):\n    user = request.user\n")["input_ids"]
    datum = common.training_datum(args.seq_len)
    windows: list[dict[str, Any]] = []
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=60))
    try:
        await trainer.create_lora.remote(TRAINEE, LoraSpec(rank=args.rank, alpha=float(args.rank)))
        await trainer.forward_backward.remote(TRAINEE, [datum])
        await trainer.save_weights_for_sampler.remote(TRAINEE, "warm")  # the first sync creates the tenant
        await trainer.save_weights_for_sampler.remote(TRAINEE, "warm-again")  # and the first in-place one
        if args.num_gpus > 0 and args.publish_images and not (await pair.server.stage_timings.remote()).get("gpu_copy_ms"):
            # the trainer falls back to shared memory for good after a failed GPU copy: nothing here
            # would then be what this benchmark is about
            raise RuntimeError("the colocated trainer did not publish by a GPU copy (the trainer actor's log says why)")
        for t in tenants + [TRAINEE]:
            await client.sample(prompt_ids, {"max_tokens": 8, "temperature": 0.0}, t)
        for r in range(args.rounds):
            for name in args.windows:
                await pair.server.set_armed_flips.remote(not name.endswith("-addlora"))
                load: list[asyncio.Task[Any]] = [asyncio.create_task(run_streams(client, t, prompt_ids, streams=args.streams,
                                                        max_tokens=args.max_tokens, duration_s=3600))
                        for t in tenants] if name.startswith("loaded") else []
                streams: list[TokenStream] | None = [] if name == "inflight" else None
                if streams is not None:
                    load += [asyncio.create_task(_stream_tokens(session, pair.url, prompt_ids, args.max_tokens, streams))
                             for _ in range(args.streams)]
                try:
                    if load:
                        await asyncio.sleep(2.0)  # every stream running
                    since = time.monotonic()
                    pubs = await _publishes(client, trainer, pair.server, prompt_ids, datum, args.publishes, streams)
                finally:
                    for task in load:
                        task.cancel()
                    await asyncio.gather(*load, return_exceptions=True)
                w = _window(name, r, pubs, _gaps_ms(streams, since) if streams else [])
                logger.info("%s", {k: v for k, v in w.items() if k != "publishes"})
                windows.append(w)
        if args.profile_exports:  # after every window, kept out of them: the profiler slows what it watches
            await trainer.profile_exports.remote(str(args.out / "export-profiles"), args.profile_exports)
            await _publishes(client, trainer, pair.server, prompt_ids, datum, args.profile_exports, None)
    finally:
        await pair.server.set_armed_flips.remote(True)
        await session.close()
        await client.aclose()
        pair.stop()
    names = list(args.windows)
    return {"machine": common.machine_name(args.machine), "date": common.today(),
            "config": {"model": "llama-8b-shape (dummy weights, bf16)" if args.shape == "8b" else "tiny",
                       "rank": args.rank, "tenants": args.tenants, "sync_mode": args.sync_mode,
                       "streams": args.streams, "publishes": args.publishes, "rounds": args.rounds,
                       "slot_builders": args.slot_builders, "stage_channel": args.stage_channel,
                       "publish_images": args.publish_images,
                       "trainer": "colocated (base on the server's weights)",
                       "cuda_graphs": args.num_gpus > 0},
            "windows": windows,
            "summary": {name: {k: statistics.median(w[k] for w in windows if w["window"] == name and k in w)
                               for k in sorted({k for w in windows if w["window"] == name for k in w})
                               if k.endswith(("_p50", "_p90", "_max"))} for name in names}}


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib.pyplot as plt

    s = result["summary"]
    parts = ("export_ms_p50", "sync_ms_p50", "first_token_ms_p50")
    fig, (ax, hops) = plt.subplots(1, 2, figsize=(12, 4))
    bottom = [0.0] * len(s)
    for part in parts:
        values = [s[n][part] for n in s]
        ax.bar(list(s), values, bottom=bottom, label=part.removesuffix("_ms_p50"))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.scatter(list(s), [s[n]["save_to_first_token_ms_p50"] for n in s], color="k", marker="_", s=600, zorder=3,
               label="call returned + first token")
    inflight = [n for n in s if "inflight_first_new_token_ms_p50" in s[n]]
    ax.scatter(inflight, [s[n]["inflight_first_new_token_ms_p50"] for n in inflight], color="r", marker="_", s=600,
               zorder=3, label="first token on the new version in flight")
    ax.axhline(50, color="k", lw=0.8, ls="--")
    ax.axhline(10, color="r", lw=0.8, ls="--")
    ax.set_ylabel("save_weights_for_sampler -> first token, ms (p50)")
    ax.legend()
    bottom = [0.0] * len(s)  # the call's hops, trainer to worker and back (HOPS), each its own p50
    colors = plt.get_cmap("tab20").colors  # type: ignore[attr-defined]  # a ListedColormap: more hops than tab10
    for (name, _, _), color in zip(HOPS, colors[::2] + colors[1::2]):
        values = [s[n].get(f"hop_{name}_ms_p50", 0.0) for n in s]
        hops.bar(list(s), values, bottom=bottom, label=name, color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    hops.set_ylabel("save_weights_for_sampler's hops, ms (p50 each)")
    hops.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for axis in (ax, hops):
        axis.tick_params(axis="x", labelrotation=15)
    common.finish_figure(fig, png, f"{result['machine']}: 8B-shape, rank {result['config']['rank']}, colocated trainer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, model=False)
    common.add_colocated_args(parser, seq_len=128)
    parser.add_argument("--shape", choices=("8b", "tiny"), default="8b", help="tiny: a CPU smoke run")
    parser.add_argument("--publishes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--slot-builders", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--publish-images", action=argparse.BooleanOptionalAction, default=True,
                        help="the trainer writes the server's slot image (slot_image), or peft files")
    parser.add_argument("--stage-channel", action=argparse.BooleanOptionalAction, default=True,
                        help="staging around the engine's loop (stage_channel), or through collective_rpc")
    parser.add_argument("--sync-mode", choices=("abort", "inplace"), default="inplace",
                        help="the trainer's sync_mode: inplace (issue 17's armed flip) or abort")
    parser.add_argument("--windows", nargs="+", choices=WINDOWS, default=list(WINDOWS))
    parser.add_argument("--profile-exports", type=int, default=0,
                        help="then this many more publications, idle, their exports profiled (torch.profiler) "
                             "into OUT/export-profiles")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from skyrl_lora.cluster import start_local_ray

    start_local_ray(num_cpus=4, namespace=None)
    result = asyncio.run(run(args))
    logger.info("wrote %s: %s", common.write_result(result, args.out, f"publish-latency-{args.shape}", plot), result["summary"])


if __name__ == "__main__":
    main()
