"""What a running API process holds: Redis clients and the worker/ layer's objects.

Built once per app by :func:`Services.connect` and reached from routes through the typed
dependencies in ``app.deps``. Artifacts are immutable (named by content), so the
in-process cache of sorted score rows and dataset targets can never serve stale data. It
holds only what rankings need — one sorted row per (matrix, test point, direction), never
a whole score matrix or dataset — and is bounded by bytes (``api_cache_bytes``). A cached
ranking read costs three Redis round-trips on the async client (rate limit, job record,
dataset record), no sort and no thread hop; a miss reads one row of the score matrix
through a memory map in the thread pool.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from starlette.concurrency import run_in_threadpool
from torch import Tensor

import models
from app.auth import ApiKeys
from app.limits import RateLimiter
from worker.main import connect
from worker.queue import JobQueue, JobRecord
from worker.settings import Settings
from worker.store import ArtifactStore, Registry

__all__ = ["ByteLRU", "Services"]

SSE_SOCKET_TIMEOUT_S = 30.0
"""Socket timeout of the async Redis client (rate limits; blocking XREADs of SSE streams)."""


class ByteLRU:
    """A thread-safe least-recently-used map bounded by the bytes of its values."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        """The value for ``key`` (now the most recent), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        """Keep ``value`` (``nbytes`` large), evicting the least recent entries to stay
        within capacity; a value larger than the whole capacity is not kept."""
        if nbytes > self.capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.size -= old[1]
            self._items[key] = (value, nbytes)
            self.size += nbytes
            while self.size > self.capacity:
                _, (_, freed) = self._items.popitem(last=False)
                self.size -= freed


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


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
        self._cache = ByteLRU(self.settings.api_cache_bytes)

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

    def dataset_row(self, record: dict[str, Any], index: int) -> models.Dataset:
        """Row ``index`` of the dataset a registry record points to, as a one-example
        Dataset with the file's metadata; only that row is read (memory map)."""
        artifact = record["artifact"]
        metadata, _ = self.store.describe(artifact)
        return models.Dataset(
            self.store.get_tensor(artifact, "inputs", index)[None],
            self.store.get_tensor(artifact, "targets", index)[None],
            json.loads(metadata.get("metadata") or "{}"),
        )

    def layout(self, record: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Per-example shape and dtype of a dataset's ``inputs`` and ``targets``: stored
        in the record at registration, else read from the file header (older records)."""
        if "tensors" in record:
            return record["tensors"]
        _, layout = self.store.describe(record["artifact"])
        return {
            name: {"shape": layout[name]["shape"][1:], "dtype": layout[name]["dtype"]}
            for name in ("inputs", "targets")
        }

    async def ranked(
        self, scores_artifact: str, row: int, descending: bool
    ) -> tuple[Tensor, Tensor]:
        """(sorted scores, training indices) of one test row of a score matrix: from the
        cache, else read and sorted in the thread pool (and cached)."""
        key = ("ranked", scores_artifact, row, descending)
        hit = self._cache.get(key)
        if hit is None:
            hit = await run_in_threadpool(self._rank, scores_artifact, row, descending)
            self._cache.put(key, hit, _nbytes(*hit))
        return hit

    def _rank(self, scores_artifact: str, row: int, descending: bool) -> tuple[Tensor, Tensor]:
        _, layout = self.store.describe(scores_artifact)
        matrix = len(layout["scores"]["shape"]) == 2
        values = self.store.get_tensor(scores_artifact, "scores", row if matrix else None)
        return values.sort(descending=descending, stable=True)

    async def targets(self, record: dict[str, Any]) -> Tensor:
        """The targets of the dataset a registry record points to (cached; inputs are
        never loaded)."""
        key = ("targets", record["artifact"])
        hit = self._cache.get(key)
        if hit is None:
            hit = await run_in_threadpool(self.store.get_tensor, record["artifact"], "targets")
            self._cache.put(key, hit, _nbytes(hit))
        return hit

    async def aclose(self) -> None:
        """Close both Redis clients."""
        await self.aredis.aclose()
        self.redis.close()
