"""Exported weights (``save_weights_external``): stored by the service, fetched by signed URL.

The SDK's only way to take trained weights out (``tinker checkpoint download``, the cookbook's
``weights.download``) is ``save_weights_external`` followed by per-file URLs that are fetched
without the API key (plain ``urllib``). So each URL carries its own authority: an HMAC over the
checkpoint, the file and an expiry, with a key the service keeps in its database (URLs stay valid
across a restart, and no one can forge one for another tenant's checkpoint).

Files are a peft adapter directory (what vLLM and ``PeftModel.from_pretrained`` load), written
with age encryption when the caller gives recipients (the cookbook always does: it generates a key
per download and decrypts on its side).
"""

from __future__ import annotations

import hashlib
import hmac
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from skyrl_lora.api.paths import TinkerPath
from skyrl_lora.errors import SkyrlError

AGE_SUFFIX = ".age"
MAX_RECIPIENTS = 10
URL_LIFETIME_S = 3600


def parse_recipients(values: list[str]) -> list[object]:
    """age recipients (``age1...`` keys or SSH public keys); a 400 naming the one that does not parse."""
    if len(values) > MAX_RECIPIENTS:
        raise SkyrlError(400, f"age_encryption_recipients: at most {MAX_RECIPIENTS}, got {len(values)}",
                         "age_encryption_recipients")
    import pyrage  # only encryption needs it (the GPU bundle, which never serves the API, has none)

    out: list[object] = []
    for i, value in enumerate(values):
        field = f"age_encryption_recipients.{i}"
        try:
            if value.startswith("age1"):
                out.append(pyrage.x25519.Recipient.from_str(value))
            elif value.startswith(("ssh-ed25519 ", "ssh-rsa ")):
                out.append(pyrage.ssh.Recipient.from_str(value))
            else:
                raise ValueError("neither an age1... key nor an ssh-ed25519/ssh-rsa public key")
        except Exception as exc:  # pyrage raises its own error types per recipient kind
            raise SkyrlError(400, f"{field}: not an age recipient ({exc})", field) from exc
    return out


@dataclass(frozen=True)
class StoredExport:
    directory: Path
    size_bytes: int


class ExternalWeightsStore:
    def __init__(self, root: Path, signing_key: str) -> None:
        self.root = root
        self._key = signing_key.encode()

    # ------------------------------------------------------------------ files (blocking: run off the loop)
    def write(self, files: dict[str, bytes], recipients: list[object]) -> StoredExport:
        """Write the export to a new directory of its own (atomically: all files or none)."""
        final = self.root / uuid.uuid4().hex
        tmp = self.root / f".tmp-{final.name}"
        tmp.mkdir(parents=True)
        size = 0
        if recipients:
            import pyrage
        try:
            for name, data in files.items():
                if recipients:
                    data, name = pyrage.encrypt(data, recipients), name + AGE_SUFFIX
                (tmp / name).write_bytes(data)
                size += len(data)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return StoredExport(final, size)

    def remove(self, directory: str) -> None:
        real = Path(directory).resolve()
        if real.parent != self.root.resolve():
            raise SkyrlError(403, f"path: '{directory}' is not an export of this service", "path")
        shutil.rmtree(real, ignore_errors=True)

    @staticmethod
    def files(directory: str) -> list[str]:
        return sorted(f.name for f in Path(directory).iterdir() if f.is_file())

    # ------------------------------------------------------------------ signed URLs
    def _signature(self, path: TinkerPath, filename: str, expires: int) -> str:
        message = f"{path}\n{filename}\n{expires}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def signed_urls(self, base_url: str, path: TinkerPath, filenames: list[str],
                    lifetime_s: int = URL_LIFETIME_S) -> tuple[dict[str, str], int]:
        """``{file: url}`` and the unix time they expire."""
        expires = int(time.time()) + lifetime_s
        prefix = f"{base_url.rstrip('/')}/api/v1/external_weights/{quote(path.run_id, safe=':')}/{quote(path.name)}"
        return {f: f"{prefix}/{quote(f)}?expires={expires}&signature={self._signature(path, f, expires)}"
                for f in filenames}, expires

    def check(self, path: TinkerPath, filename: str, expires: int, signature: str) -> None:
        if not hmac.compare_digest(self._signature(path, filename, expires), signature):
            raise SkyrlError(403, "signature: not a valid download URL for this file", "signature")
        if expires < time.time():
            raise SkyrlError(403, "expires: this download URL has expired; ask for new ones", "expires")
