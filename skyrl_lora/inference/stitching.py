"""Pure logic for continuing an aborted sample: the continuation request and the stitched result."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from skyrl_lora.inference.protocol import FinishReason, SampleOut, SamplingParamsIn, VersionSpan


@dataclass
class StitchedSample:
    """A sample assembled from one or more segments (each segment ended by an abort but the last)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] | None = None
    version_spans: list[VersionSpan] = field(default_factory=list)
    finish_reason: FinishReason = "abort"
    stop_reason: str | int | None = None
    segments: int = 0
    num_cached_tokens: int = 0
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None

    def add(self, seg: SampleOut) -> None:
        offset = len(self.token_ids)
        if len(seg.logprobs) != len(seg.token_ids):
            raise ValueError(f"segment has {len(seg.token_ids)} tokens but {len(seg.logprobs)} logprobs")
        self.token_ids.extend(seg.token_ids)
        self.logprobs.extend(seg.logprobs)
        if seg.top_logprobs is not None:
            self.top_logprobs = (self.top_logprobs or []) + list(seg.top_logprobs)
        for span in seg.version_spans:
            shifted = VersionSpan(version=span.version, start=span.start + offset, end=span.end + offset)
            last = self.version_spans[-1] if self.version_spans else None
            if last is not None and last.version == shifted.version and last.end == shifted.start:
                self.version_spans[-1] = VersionSpan(version=last.version, start=last.start, end=shifted.end)
            elif shifted.end > shifted.start:
                self.version_spans.append(shifted)
        self.finish_reason = seg.finish_reason
        self.stop_reason = seg.stop_reason
        self.segments += 1
        if self.segments == 1:  # continuations re-read prompt + prefix: the first segment's prompt view counts
            self.num_cached_tokens = seg.num_cached_tokens
            self.prompt_logprobs = seg.prompt_logprobs
            self.prompt_top_logprobs = seg.prompt_top_logprobs

    def as_sample(self) -> SampleOut:
        return SampleOut(token_ids=self.token_ids, logprobs=self.logprobs, top_logprobs=self.top_logprobs,
                         finish_reason=self.finish_reason, stop_reason=self.stop_reason,
                         version_spans=self.version_spans, num_cached_tokens=self.num_cached_tokens,
                         prompt_logprobs=self.prompt_logprobs, prompt_top_logprobs=self.prompt_top_logprobs,
                         continuations=max(0, self.segments - 1))


def continuation_params(params: SamplingParamsIn, generated: int, segment_index: int) -> SamplingParamsIn | None:
    """Sampling parameters for the next segment, or None when the budget is already spent."""
    remaining = params.max_tokens - generated
    if remaining <= 0:
        return None
    seed = None if params.seed is None else (params.seed + 7919 * segment_index) % (2**63)
    return params.model_copy(update={"max_tokens": remaining, "min_tokens": max(0, params.min_tokens - generated),
                                     "seed": seed, "prompt_logprobs": None})


def find_seam_stop(decode: Callable[[Sequence[int]], str], tail: Sequence[int], new: Sequence[int],
                   stops: Sequence[str]) -> tuple[int, str] | None:
    """A stop string that starts in the previous segment's tail and ends in the new tokens.

    Returns (number of new tokens to keep, the stop string) for the earliest such match, or None.
    vLLM itself catches stop strings wholly inside the new tokens; only the seam needs us.
    """
    if not stops or not tail or not new:
        return None
    tail_text = decode(tail)
    cut = len(tail_text)
    for keep in range(1, len(new) + 1):
        text = decode(list(tail) + list(new[:keep]))
        for stop in stops:
            start = text.find(stop, max(0, cut - len(stop) + 1))
            if start != -1 and start < cut < start + len(stop):
                return keep, stop
        if len(text) - cut >= max(len(s) for s in stops):
            break
    return None
