"""A restarted Ray actor asks itself to resume its work: nobody else knows that it restarted.

The call goes out from a thread once ``__init__`` has run. Ray can still refuse it while the actor is
marked RESTARTING (seen in CI with Ray 2.60: ``ActorUnavailableError: The actor is restarting``, and
an actor task is not retried by default), so the call is repeated until it runs, up to a deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)


def call_self_after_restart(method: str, *, deadline_s: float = 300.0, result_timeout_s: float = 1800.0,
                            handle: Any = None) -> threading.Thread:
    """Call ``method`` (no arguments) on the current actor (or ``handle``) from a daemon thread; returns the thread."""
    import ray
    from ray.exceptions import ActorUnavailableError

    if handle is None:
        handle = ray.get_runtime_context().current_actor

    def call_until_it_runs() -> None:
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                ray.get(getattr(handle, method).remote(), timeout=result_timeout_s)
                logger.info("restarted actor: %s done", method)
                return
            except ActorUnavailableError as exc:  # still marked restarting: ask again shortly
                if time.monotonic() > deadline:
                    logger.error("restarted actor: %s never ran within %.0f s (%s)", method, deadline_s, exc)
                    return
                time.sleep(0.2)
            except Exception:  # the method itself failed: its own log says why; nothing to retry
                logger.exception("restarted actor: %s failed", method)
                return

    thread = threading.Thread(target=call_until_it_runs, name=f"restart-{method}", daemon=True)
    thread.start()
    return thread
