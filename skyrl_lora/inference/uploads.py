"""Adapter versions sent to a server over HTTP, for servers on another node than the trainer.

On the trainer's node a new version reaches the servers through shared memory (they read the files
the trainer wrote to /dev/shm). A server on another node cannot read those files and, without a
shared filesystem, not the durable copy either; the client then sends the files themselves to it
(``PUT /skyrl/v1/uploads/{upload_id}/{file}``), into this store in *that* server's node memory
(/dev/shm), and stages from there. The upload stays the path that server serves the version from
(vLLM reloads an evicted adapter from it, and a restarted server process finds it in /dev/shm) until
the version is replaced or unloaded; an upload that is never staged is swept after ``ttl_s``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from skyrl_lora.errors import SkyrlError

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
UPLOAD_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class UploadError(SkyrlError):
    """An upload refused (bad name, too large, unknown id); ``status`` is the HTTP status."""


def default_upload_root(state_dir: str | None) -> Path:
    """Node memory where it exists; stable for one server's ``state_dir`` so that a restarted server
    process finds the versions it served (a server without one gets a fresh directory)."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    key = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:12] if state_dir else uuid.uuid4().hex[:12]
    return base / "skyrl_lora" / "uploads" / key


class UploadStore:
    def __init__(self, root: Path, *, max_bytes: int, ttl_s: float) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.root.mkdir(parents=True, exist_ok=True)

    def _folder(self, upload_id: str) -> Path:
        """Where an upload's files go; an id that could name anything outside the store is a 400."""
        if re.fullmatch(UPLOAD_ID_PATTERN, upload_id) is None:
            raise UploadError(400, f"upload_id: '{upload_id[:64]}' does not match {UPLOAD_ID_PATTERN}", "upload_id")
        return self.root / upload_id

    def path(self, upload_id: str) -> Path:
        """The directory of a complete upload (both adapter files), or a 400 naming ``upload_id``."""
        folder = self._folder(upload_id)
        if not all((folder / f).is_file() for f in ADAPTER_FILES):
            raise UploadError(400, f"upload_id: no complete upload '{upload_id}' on this server (send "
                                   f"{' and '.join(ADAPTER_FILES)} first)", "upload_id")
        return folder

    def owns(self, path: str | Path) -> bool:
        return Path(path).resolve().parent == self.root.resolve()

    async def receive(self, upload_id: str, filename: str, chunks: AsyncIterator[bytes],
                      in_use: Iterable[str]) -> int:
        """Write one adapter file of an upload; returns its size. Refuses names other than the
        adapter's two files (400) and bodies over ``max_bytes`` (413), leaving nothing behind."""
        folder = self._folder(upload_id)
        if filename not in ADAPTER_FILES:
            raise UploadError(400, f"filename: '{filename}' is not one of {list(ADAPTER_FILES)}", "filename")
        await asyncio.to_thread(self.sweep, in_use)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / filename
        partial = folder / f".{filename}.partial"
        size = 0
        try:
            with partial.open("wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise UploadError(413, f"{filename}: over this server's upload limit of {self.max_bytes} "
                                               "bytes", filename)
                    await asyncio.to_thread(out.write, chunk)
            partial.replace(target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return size

    def remove(self, path: str | Path) -> None:
        """Free an upload once nothing serves it (a path outside this store is left alone)."""
        if self.owns(path):
            shutil.rmtree(path, ignore_errors=True)

    def sweep(self, in_use: Iterable[str]) -> None:
        """Drop uploads older than ``ttl_s`` that no staged or serving version uses."""
        keep = {Path(p).resolve() for p in in_use}
        cutoff = time.time() - self.ttl_s
        for folder in self.root.iterdir() if self.root.is_dir() else ():
            if folder.resolve() not in keep and folder.stat().st_mtime < cutoff:
                logger.info("dropping upload %s: never staged, or no longer served", folder.name)
                shutil.rmtree(folder, ignore_errors=True)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
