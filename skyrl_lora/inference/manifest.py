"""What a restarted inference server needs to come back as it was: its port and every tenant's adapter.

Each server writes its own file in a directory the servers of a deployment share (one node's disk in
a local cluster, a shared filesystem across nodes): ``manifest-<server>.json`` maps tenant -> the adapter
path it serves now, with the time of the change (``null`` once unloaded). A server that restarts
merges every file and takes the newest entry per tenant, so it also catches up on syncs that other
servers applied while it was down. Files are replaced atomically (write, then rename).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class AdapterManifest:
    def __init__(self, directory: str | Path, server_key: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = "".join(c if c.isalnum() or c in "-_." else "_" for c in server_key)
        self._path = self.dir / f"manifest-{self.key}.json"
        self._entries: dict[str, dict[str, Any]] = self._read(self._path)
        self._lock = asyncio.Lock()

    @staticmethod
    def _read(path: Path) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable adapter manifest %s: %s", path, exc)
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict) and "t" in v}

    def current(self) -> dict[str, str | None]:
        """Tenant -> newest adapter path over every server's file (``None``: unloaded)."""
        newest: dict[str, dict[str, Any]] = {}
        for path in sorted(self.dir.glob("manifest-*.json")):
            for name, entry in self._read(path).items():
                if name not in newest or entry["t"] > newest[name]["t"]:
                    newest[name] = entry
        return {name: entry.get("path") for name, entry in newest.items()}

    async def record(self, name: str, path: str | None) -> None:
        async with self._lock:
            self._entries[name] = {"path": path, "t": time.time()}
            await asyncio.to_thread(self._write, dict(self._entries))

    def _write(self, entries: dict[str, dict[str, Any]]) -> None:
        tmp = self._path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, self._path)

    # ------------------------------------------------------------------ the address
    def saved_port(self) -> int | None:
        try:
            return int((self.dir / f"port-{self.key}").read_text())
        except (OSError, ValueError):
            return None

    def save_port(self, port: int) -> None:
        (self.dir / f"port-{self.key}").write_text(str(port))
