"""The Tinker service: its parts by resource over one shared core, and its lifecycle.

``models`` (sessions and training runs), ``training`` (forward/backward, optimizer steps, saves and
loads, in each model's ``seq_id`` order), ``sampling`` (samplers and samples) and ``checkpoints``
(listings, expiry, downloads) share a ``ServiceCore``: settings, database, futures, idempotency keys,
the trainer (any ``TrainerBackend``: the Ray actor in a deployment, a fake in unit tests) and the
inference client.
"""

from __future__ import annotations

import logging

from cachetools import LRUCache

from skyrl_lora.api.checkpoints import Checkpoints
from skyrl_lora.api.core import ServiceCore
from skyrl_lora.api.db import Database, hash_key
from skyrl_lora.api.futures import Futures
from skyrl_lora.api.idempotency import IdempotencyKeys
from skyrl_lora.api.models import Models
from skyrl_lora.api.sampling import Sampling
from skyrl_lora.api.settings import ApiSettings
from skyrl_lora.api.trainer_backend import TrainerBackend
from skyrl_lora.api.training import Training
from skyrl_lora.errors import SkyrlError
from skyrl_lora.inference.client import RemoteInferenceClient

logger = logging.getLogger(__name__)


class TinkerService:
    def __init__(self, settings: ApiSettings, trainer: TrainerBackend, inference: RemoteInferenceClient,
                 db: Database) -> None:
        self.core = ServiceCore(settings, trainer, inference, db)
        self.models = Models(self.core)
        self.sampling = Sampling(self.core)
        self.training = Training(self.core, self.models, self.sampling)
        self.checkpoints = Checkpoints(self.core)
        self._users: LRUCache[str, str] = LRUCache(maxsize=10_000)  # api key -> user, valid keys only

    @property
    def settings(self) -> ApiSettings:
        return self.core.settings

    @property
    def futures(self) -> Futures:
        return self.core.futures

    @property
    def idempotency(self) -> IdempotencyKeys:
        return self.core.idempotency

    @property
    def inference(self) -> RemoteInferenceClient:
        return self.core.inference

    # ------------------------------------------------------------------ lifecycle
    def startup(self) -> None:
        self.core.db.register_keys(self.core.settings.api_keys)
        failed = self.core.db.fail_unfinished_futures()
        if failed:
            logger.warning("%d futures were running at the last shutdown; reported failed", failed)

    async def start(self) -> None:
        """Work that runs on the serving loop for the service's lifetime."""
        self.core.expiry.start()

    async def shutdown(self) -> None:
        await self.core.expiry.stop()
        await self.core.futures.close()
        await self.core.inference.aclose()

    async def authenticate(self, api_key: str | None) -> str:
        """The user of an ``X-API-Key`` (401 naming the header without a valid one). Found keys are
        remembered: keys come from settings and are never revoked while the service runs."""
        if not api_key:
            raise SkyrlError(401, "X-API-Key: missing", "X-API-Key")
        user = self._users.get(api_key)
        if user is None:
            digest = hash_key(api_key)
            user = await self.core.db.run(lambda s: Database.user_for(s, digest))
            if user is None:
                raise SkyrlError(401, "X-API-Key: not a valid key", "X-API-Key")
            self._users[api_key] = user
        return user
