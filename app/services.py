"""What a running API process holds: Redis clients and the worker/ layer's objects.

Built once per app by :func:`Services.connect` and reached from routes through the typed
dependencies in ``app.deps``. Artifacts are immutable (named by content), so the small
in-process LRU of loaded score matrices, sorted rows and datasets can never serve stale
data: a cached ranking read costs three Redis round-trips on the async client (rate
limit, job record, dataset record) and no sort.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import redis
import redis.asyncio
from torch import Tensor

import models
from app.auth import ApiKeys
from app.limits import RateLimiter
from worker.main import connect
from worker.queue import JobQueue, JobRecord
from worker.settings import Settings
from worker.store import ArtifactStore, Registry

__all__ = ["Services"]

_LOADED_ARTIFACTS = 64
"""Score matrices, rankings and datasets kept in memory per API process."""
SSE_SOCKET_TIMEOUT_S = 30.0
"""Socket timeout of the async Redis client (rate limits; blocking XREADs of SSE streams)."""


@dataclass
class Services:
    """The API's handles on Redis, the job queue, the artifact store and the registry."""

    settings: Settings
    redis: redis.Redis
    aredis: redis.asyncio.Redis
    queue: JobQueue
    store: ArtifactStore
    registry: Registry
    api_keys: ApiKeys
    limiter: RateLimiter

    @classmethod
    def connect(cls, settings: Settings) -> Services:
        """Connect to ``settings.redis_url`` (required: ``serve`` fills it in when it starts
        the embedded Redis) and open the artifact store under ``data_dir``."""
        client = connect(settings)
        store = ArtifactStore.for_settings(settings)
        aclient = redis.asyncio.Redis.from_url(
            str(settings.redis_url), decode_responses=True, socket_timeout=SSE_SOCKET_TIMEOUT_S
        )
        return cls(
            settings=settings,
            redis=client,
            aredis=aclient,
            queue=JobQueue(client, settings),
            store=store,
            registry=Registry(client, settings, store),
            api_keys=ApiKeys(settings.api_keys, settings.default_tenant),
            limiter=RateLimiter(
                aclient,
                settings.key_prefix,
                rate_per_s=settings.rate_limit_per_s,
                burst=settings.rate_limit_burst,
            ),
        )

    def __post_init__(self) -> None:
        self._tensors = lru_cache(maxsize=_LOADED_ARTIFACTS)(self.store.get_tensors)
        self._ranked = lru_cache(maxsize=_LOADED_ARTIFACTS)(self._rank)
        self._datasets = lru_cache(maxsize=_LOADED_ARTIFACTS)(self._load_dataset)

    async def job(self, job_id: str, tenant: str) -> JobRecord | None:
        """The tenant's job, read without a thread hop (the hot path of cached rankings and
        of SSE streams); None for a missing job or another tenant's."""
        fields = await self.aredis.hgetall(self.queue.keys.job(job_id))
        if not fields or fields.get("tenant") != tenant:
            return None
        return JobRecord.from_hash(job_id, fields)

    async def dataset_record(self, tenant: str, dataset_id: str) -> dict[str, Any] | None:
        """The tenant's registry record of a dataset (async twin of Registry.get_dataset)."""
        raw = await self.aredis.hget(self.queue.keys.datasets(tenant), dataset_id)
        return json.loads(raw) if raw else None

    def dataset(self, record: dict[str, Any]) -> models.Dataset:
        """The dataset a registry record points to, memoised by its artifact id."""
        return self._datasets(record["artifact"])

    def _load_dataset(self, artifact_id: str) -> models.Dataset:
        return models.load_dataset_bytes(self.store.get_bytes(artifact_id))

    def ranked(self, scores_artifact: str, row: int, descending: bool) -> tuple[Tensor, Tensor]:
        """(sorted scores, training indices) of one test row of a score matrix, memoised."""
        return self._ranked(scores_artifact, row, descending)

    def _rank(self, scores_artifact: str, row: int, descending: bool) -> tuple[Tensor, Tensor]:
        scores = self._tensors(scores_artifact)["scores"]
        values = scores if scores.dim() == 1 else scores[row]
        return values.sort(descending=descending, stable=True)

    async def aclose(self) -> None:
        await self.aredis.aclose()
        self.redis.close()
