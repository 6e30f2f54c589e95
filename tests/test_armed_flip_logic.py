"""The worker's bookkeeping of staged and armed in-place versions (``vllm_compat.worker``) as pure
logic: a stub build stands in for vLLM's load, so that each interleaving of the staging threads,
the server's discards and the engine's thread is set up exactly, which a real server only meets by
chance. That the flips themselves serve the right weights is shown on a real server
(``test_staging.py::test_an_inplace_version_is_armed_and_flips_before_the_next_step``)."""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from skyrl_lora.inference.vllm_compat.worker import LoraStagingWorkerExtension

LORA_ID = 7


class _Worker(LoraStagingWorkerExtension):
    """The extension on a stub worker: builds wait for ``release``; add_lora records its requests."""

    def __init__(self, layout: Any = None, registered: dict[int, Any] | None = None) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.builds: list[str] = []
        self.applying_image_at_add: list[Any] = []
        self.added: list[str] = []
        self.registered_at_add: list[Any] = []
        adapter_manager = SimpleNamespace(_registered_adapters=registered or {}, lora_index_to_id=[LORA_ID])
        self.model_runner = SimpleNamespace(lora_manager=SimpleNamespace(_adapter_manager=adapter_manager))
        self._skyrl_stage_state = {
            "jobs": {}, "lock": threading.Lock(), "images": {}, "armed": {}, "tickets": {},
            "applying": None, "channel": None,
            "pool": concurrent.futures.ThreadPoolExecutor(2), "layout": layout, "add_lora": self._add_lora,
            "flip_log": collections.deque(maxlen=16), "timings": {"armed_to_applied_ms": [], "flip_ms": []}}

    def _skyrl_build(self, lora_request: Any, source: str) -> tuple[Any, Any]:
        self.builds.append(lora_request.lora_path)
        self.started.set()
        assert self.release.wait(30), "the test never released the build"
        return SimpleNamespace(id=lora_request.lora_int_id, path=lora_request.lora_path), SimpleNamespace(lora=None)

    def _add_lora(self, request: Any) -> bool:
        self.added.append(request.lora_path)
        applying = self._skyrl_stage_state["applying"]
        self.applying_image_at_add.append(applying.image if applying is not None else "none applying")
        self.registered_at_add.append(self.model_runner.lora_manager._adapter_manager._registered_adapters.get(LORA_ID))
        return True

    def job(self, path: str) -> concurrent.futures.Future[Any]:
        _, job = self._skyrl_stage_state["jobs"][LORA_ID]
        assert _ == path
        return job


@pytest.fixture
def worker() -> Any:
    w = _Worker()
    yield w
    w.release.set()
    w._skyrl_stage_state["pool"].shutdown(wait=True)


def test_discarding_another_staging_keeps_a_committed_armed_flip(worker: _Worker) -> None:
    """v2 is staged, armed and committed (the engine has not stepped since); v3, staged beside it
    under the same id (in-place versions share it), is discarded: v2 still flips in."""
    worker.release.set()
    worker.skyrl_stage_lora(LORA_ID, "t", "/v2", "/shm/v2", arm=True)
    worker.job("/v2").result(timeout=30)
    worker.skyrl_stage_lora(LORA_ID, "t", "/v3", "/shm/v3", arm=False)
    worker.job("/v3").result(timeout=30)
    worker.skyrl_discard_lora(LORA_ID, "/v3")
    assert worker._skyrl_apply_armed() == 1 and worker.added == ["/v2"]
    assert worker._skyrl_stage_state["flip_log"][-1]["error"] is None


def test_the_same_command_twice_stages_once(worker: _Worker) -> None:
    """A command that came both as a late datagram and as its resend through the engine makes one
    job: a trainer's image buffer is read once, before the notice lets the trainer reuse it."""
    worker.skyrl_stage_lora(LORA_ID, "t", "/v2", "/shm/v2", arm=True)
    first = worker.job("/v2")
    worker.skyrl_stage_lora(LORA_ID, "t", "/v2", "/shm/v2", arm=True)
    assert worker.job("/v2") is first
    worker.release.set()
    first.result(timeout=30)
    assert worker.builds == ["/v2"]


def test_a_version_staged_two_phase_and_then_synced_armed_is_armed(worker: _Worker) -> None:
    """The same version staged first for a two-phase commit (not armed) and then sent by an armed
    sync is no duplicate: it is staged again and armed, so the sync's flip happens."""
    worker.release.set()
    worker.skyrl_stage_lora(LORA_ID, "t", "/v2", "/shm/v2", arm=False)
    worker.job("/v2").result(timeout=30)
    worker.skyrl_stage_lora(LORA_ID, "t", "/v2", "/shm/v2", arm=True)
    worker.job("/v2").result(timeout=30)
    assert worker.builds == ["/v2", "/v2"] and worker._skyrl_apply_armed() == 1 and worker.added == ["/v2"]


def test_a_staging_discarded_and_sent_again_arms_only_the_new_job(worker: _Worker) -> None:
    """The server gave up on a version while it built and sent the same version again: the first
    job, whose entry was replaced, does not arm; the second does, once."""
    worker.skyrl_stage_lora(LORA_ID, "t", "/v2", "/shm/v2", arm=True)
    first = worker.job("/v2")
    assert worker.started.wait(30)
    worker.skyrl_discard_lora(LORA_ID, "/v2")
    worker.skyrl_stage_lora(LORA_ID, "t", "/v2", "/shm/v2", arm=True)
    second = worker.job("/v2")
    worker.release.set()
    with pytest.raises(RuntimeError, match="discarded"):
        first.result(timeout=30)
    second.result(timeout=30)
    assert worker._skyrl_apply_armed() == 1 and worker.added == ["/v2"]


def test_a_staging_discarded_while_it_builds_is_never_armed(worker: _Worker) -> None:
    """The server gave up on a version (its staging timed out) while the worker still built it: the
    build ends with an error, nothing is armed, and the next step flips nothing in."""
    worker.skyrl_stage_lora(LORA_ID, "t", "/v2", "/shm/v2", arm=True)
    job = worker.job("/v2")
    assert worker.started.wait(30)  # building (a job not started yet would simply be cancelled)
    worker.skyrl_discard_lora(LORA_ID, "/v2")
    worker.release.set()
    with pytest.raises(RuntimeError, match="discarded"):
        job.result(timeout=30)
    assert worker._skyrl_stage_state["armed"] == {} and worker._skyrl_apply_armed() == 0 and worker.added == []
    assert worker.skyrl_staged_count() == 0


def test_an_armed_job_applied_before_its_future_resolved_is_forgotten(worker: _Worker) -> None:
    """The engine's thread may apply a flip between the job arming it and the job's future resolving
    (it then cannot drop the entry): the future's callback drops it, so nothing stays staged. An
    entry whose flip still waits is kept for the engine's thread."""
    worker.release.set()
    worker.skyrl_stage_lora(LORA_ID, "t", "/v2", "/shm/v2", arm=True)
    job = worker.job("/v2")
    job.result(timeout=30)
    state = worker._skyrl_stage_state
    worker._skyrl_forget_applied(LORA_ID, "/v2", job)  # its flip still waits: kept
    assert state["jobs"][LORA_ID] == ("/v2", job)
    state["armed"].clear()  # as if the engine's thread applied it before the job finished
    worker._skyrl_forget_applied(LORA_ID, "/v2", job)
    assert LORA_ID not in state["jobs"] and worker.skyrl_staged_count() == 0


def test_a_failed_in_place_flip_is_undone_and_vllms_load_takes_over() -> None:
    """The slot copy fails after the new model was registered: the old model is registered again
    before vLLM's own in-place load runs, and that load is given no slot image (which would repeat
    the failed copy), so vLLM's activation writes every module itself."""

    class _BrokenLayout:
        def flip(self, index: int, image: Any) -> None:
            raise RuntimeError("copy failed")

    old = SimpleNamespace(id=LORA_ID, path="/v1")
    w = _Worker(layout=_BrokenLayout(), registered={LORA_ID: old})
    try:
        w.release.set()
        w.skyrl_stage_lora(LORA_ID, "t", "/v2", "/shm/v2", arm=True)
        w.job("/v2").result(timeout=30)
        assert w._skyrl_apply_armed() == 1
        assert w.added == ["/v2"] and w.registered_at_add == [old] and w.applying_image_at_add == [None]
        assert w._skyrl_stage_state["flip_log"][-1]["error"] is None
    finally:
        w._skyrl_stage_state["pool"].shutdown(wait=True)
