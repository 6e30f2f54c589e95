"""A restarted actor resumes itself, and keeps asking while Ray refuses the call as "restarting".

CI once saw the inference server actor come back idle: its one self-call was refused with
``ActorUnavailableError: The actor is restarting`` (the moment between the new process and Ray
marking it alive) and, as an actor task, not retried. That moment cannot be hit on demand, so the
second test has a real actor refuse the same way twice.
"""

from __future__ import annotations

import os
import time

import ray
from ray.exceptions import ActorUnavailableError

from skyrl_lora.actor_restart import call_self_after_restart


class _Resumable:
    def __init__(self) -> None:
        self.resumed_in: int | None = None
        if ray.get_runtime_context().was_current_actor_reconstructed:
            self._call = call_self_after_restart("resume", deadline_s=60)

    def resume(self) -> int:
        self.resumed_in = os.getpid()
        return self.resumed_in

    def pid(self) -> int:
        return os.getpid()

    def resumed(self) -> int | None:
        return self.resumed_in


class _RefusesTwice:
    def __init__(self) -> None:
        self.calls = 0

    def resume(self) -> int:
        self.calls += 1
        if self.calls <= 2:
            raise ActorUnavailableError("The actor is restarting.", None)
        return self.calls

    def count(self) -> int:
        return self.calls


def test_a_restarted_actor_resumes_itself(ray_local) -> None:
    actor = ray.remote(_Resumable).options(max_restarts=1, max_concurrency=4).remote()
    first = ray.get(actor.pid.remote(), timeout=60)
    assert ray.get(actor.resumed.remote(), timeout=60) is None  # a first start resumes nothing
    ray.kill(actor, no_restart=False)
    deadline = time.monotonic() + 120
    while True:
        try:
            resumed = ray.get(actor.resumed.remote(), timeout=30)
        except ActorUnavailableError:
            resumed = None  # still restarting
        if resumed is not None:
            break
        assert time.monotonic() < deadline, "the restarted actor never ran its own resume call"
        time.sleep(0.1)
    assert resumed != first  # ran in the new process
    ray.kill(actor, no_restart=True)


def test_a_refused_self_call_is_asked_again(ray_local) -> None:
    actor = ray.remote(_RefusesTwice).remote()
    thread = call_self_after_restart("resume", deadline_s=60, handle=actor)
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert ray.get(actor.count.remote(), timeout=30) == 3  # refused twice, then ran
    ray.kill(actor)
