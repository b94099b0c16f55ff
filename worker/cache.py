"""Cache keys: sha256 of the canonical JSON of everything a result depends on.

- ``result_key``: checkpoint id, training dataset id, test content id, loss, hessian,
  damping, weight decay, solver settings and ``ENGINE_VERSION`` (no test for
  self-influence) → the tenant's succeeded
  job (``JobQueue.cached_job``); a hit is answered from Redis without a worker.
- ``s_test_key``: the same minus nothing that the ranking needs — the s_test matrix
  ``(G + λI)⁻¹ ∇L_q`` (Eqn 50) does not depend on how scores are sharded or ranked, and is
  shared by all tenants (it is keyed by content ids only) → artifact id, so a retried or
  re-run query, or a verify job, skips the solve.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import redis

from models.checkpoints import canonical_json
from worker.contract import (
    ENGINE_VERSION,
    InfluencePayload,
    JobKind,
    Keys,
    SelfInfluencePayload,
    TestSpec,
    payload_model,
)
from worker.settings import Settings

__all__ = ["STestCache", "query_content_id", "result_key", "s_test_key"]


def _digest(value: Any) -> str:
    """sha256 hex of the value's canonical JSON (``models.checkpoints.canonical_json``)."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def query_content_id(test: TestSpec) -> str:
    """Content id of the test points: the tensor artifact's id (its bytes' sha256), or a
    digest of (dataset id, indices)."""
    if test.artifact is not None:
        return test.artifact
    return _digest({"dataset": test.dataset, "indices": test.indices})


def _engine_fields(payload: InfluencePayload | SelfInfluencePayload) -> dict[str, Any]:
    """Everything an engine's numbers depend on, as JSON (test points by content id)."""
    test = getattr(payload, "test", None)
    return {
        "checkpoint": payload.model,
        "train": payload.train,
        "test": query_content_id(test) if test is not None else None,
        "loss": payload.loss,
        "hessian": payload.hessian,
        "damping": payload.damping,
        "weight_decay": payload.weight_decay,
        "solver": payload.solver.model_dump(mode="json"),
        "engine": ENGINE_VERSION,
    }


def result_key(kind: JobKind | str, payload: dict[str, Any]) -> str:
    """Result-cache key of an influence or self-influence query (payload as submitted)."""
    kind = JobKind(kind)
    if kind not in (JobKind.INFLUENCE, JobKind.SELF_INFLUENCE):
        raise ValueError(f"no result cache for job kind {kind.value!r}")
    parsed = payload_model(kind).model_validate(payload)
    return _digest({"kind": kind.value, **_engine_fields(parsed)})


def s_test_key(payload: InfluencePayload | dict[str, Any]) -> str:
    """Key of the s_test matrix an influence query needs."""
    payload = InfluencePayload.model_validate(payload)
    return _digest({"kind": "s_test", **_engine_fields(payload)})


class STestCache:
    """s_test key → (artifact id, solver report), in Redis with the cache TTL."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        """``client`` decodes responses; entries live ``settings.cache_ttl_seconds``."""
        self.redis = client
        self.keys = Keys(settings.key_prefix)
        self.ttl = settings.cache_ttl_seconds or None

    def get(self, key: str) -> tuple[str, dict[str, Any]] | None:
        """(artifact id, solver report) stored for ``key``, or None."""
        raw = self.redis.get(self.keys.s_test_cache(key))
        if raw is None:
            return None
        entry = json.loads(raw)
        return entry["artifact"], entry["report"]

    def put(self, key: str, artifact_id: str, report: dict[str, Any]) -> None:
        """Remember that s_test ``key`` is artifact ``artifact_id`` (with its report)."""
        entry = json.dumps({"artifact": artifact_id, "report": report})
        self.redis.set(self.keys.s_test_cache(key), entry, ex=self.ttl)
