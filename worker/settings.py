"""Service settings shared by the API and the workers (environment variables).

Every knob is a field with a description; ``Settings.model_fields`` is the reference and
``docs/service-internals.md`` lists them. Environment names are ``INFLUENCE_<FIELD>``
except ``REDIS_URL``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MAX_TEST_POINTS = 256
"""Ceiling on test points per request (``app.schemas`` validates against it; the setting
``max_test_points`` may lower it)."""

__all__ = ["MAX_TEST_POINTS", "Settings", "load_settings"]


class Settings(BaseSettings):
    """Configuration of one deployment: Redis, artifact store, queue semantics, API limits."""

    model_config = SettingsConfigDict(
        env_prefix="INFLUENCE_",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
        # errors name the field and the problem, never the value: api_keys holds secrets
        hide_input_in_errors=True,
    )

    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_URL", "INFLUENCE_REDIS_URL"),
        description="Redis URL (redis://host:port/db or unix://path). None: `serve` starts an "
        "embedded Redis with append-only persistence under data_dir.",
    )
    data_dir: Path = Field(
        Path.home() / ".influence-service",
        description="Directory of the content-addressed artifact store (a shared volume when "
        "workers run on other machines) and of the embedded Redis data.",
    )
    key_prefix: str = Field(
        "infl:",
        min_length=1,
        description="Prefix of every Redis key this deployment uses (tests use their own).",
    )
    lease_seconds: float = Field(
        30.0,
        gt=0,
        description="A claimed job whose worker sent no heartbeat for this long is taken over "
        "by another worker (XAUTOCLAIM min-idle).",
    )
    heartbeat_seconds: float = Field(
        5.0,
        gt=0,
        description="How often a busy worker renews its lease; must be below lease_seconds.",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description="Attempts before a job goes to the dead-letter list with its last error.",
    )
    job_time_limit_seconds: float = Field(
        3600.0,
        gt=0,
        description="Wall-clock limit of one attempt; checked at every progress report, an "
        "attempt over it fails the job (no retry).",
    )
    shard_size: int = Field(
        4096,
        ge=1,
        description="Training points per score_shard job; a training set larger than this is "
        "scored by several shard jobs that any worker can take.",
    )
    cache_ttl_seconds: int = Field(
        7 * 24 * 3600,
        ge=0,
        description="Lifetime of result and s_test cache entries in Redis (0: no expiry).",
    )
    result_ttl_seconds: int = Field(
        0,
        ge=0,
        description="Lifetime of a finished job's record and events in Redis (0: keep "
        "forever); its artifacts stay in the store.",
    )
    model_cache_size: int = Field(
        4,
        ge=1,
        description="Models/datasets each worker keeps loaded (LRU by content id).",
    )
    max_upload_bytes: int = Field(
        64 * 2**20,
        gt=0,
        description="Largest accepted upload (checkpoint or dataset), counted on streamed bytes.",
    )
    max_body_bytes: int = Field(8 * 2**20, gt=0, description="Largest accepted JSON request body.")
    max_dataset_size: int = Field(
        200_000, gt=0, description="Most examples an uploaded dataset may hold."
    )
    max_test_points: int = Field(
        MAX_TEST_POINTS,
        gt=0,
        le=MAX_TEST_POINTS,
        description=f"Most test points in one influence request (at most {MAX_TEST_POINTS}, "
        "the API's ceiling: a deployment can lower it, not raise it).",
    )
    api_keys: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description='API keys and their tenants: "key1:tenant1,key2:tenant2" or a JSON object. '
        "Empty: no auth, one tenant (default_tenant), and the API binds to loopback only.",
    )
    default_tenant: str = Field("default", description="Tenant used when api_keys is empty.")
    rate_limit_per_s: float = Field(
        50.0, gt=0, description="Sustained requests per second allowed per API key."
    )
    rate_limit_burst: int = Field(100, ge=1, description="Burst size of the per-key rate limit.")
    device: str = Field("cpu", description='Torch device of a worker: "cpu", "cuda", "cuda:1".')
    compile_scoring: bool = Field(
        False,
        description="Workers score through torch.compile (InfluenceEngine compile_scoring): "
        "the first scoring of each model compiles (seconds), later ones run up to ~14% faster. "
        "Worth it for large training sets queried often.",
    )
    dead_letter_max: int = Field(
        10_000,
        ge=1,
        description="Entries kept on the dead-letter list (oldest dropped first).",
    )
    api_cache_bytes: int = Field(
        256 * 2**20,
        ge=0,
        description="Memory each API process may use for sorted score rows and dataset "
        "targets/rows it serves rankings and items from (LRU by bytes; 0: no cache).",
    )
    worker_seen_seconds: float = Field(
        30.0,
        gt=0,
        description="A worker counts as alive if seen within this many seconds (a busy worker "
        "is seen at every heartbeat, so this must be above heartbeat_seconds).",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if not text:
            return {}
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:  # its message has positions, not content
                raise ValueError(f"api_keys is not valid JSON ({exc})") from None
            if not isinstance(parsed, dict):
                raise ValueError("api_keys JSON must be an object {key: tenant}")
            for position, (key, tenant) in enumerate(parsed.items(), start=1):
                if not key or not isinstance(tenant, str) or not tenant:
                    raise ValueError(
                        f"api_keys JSON entry #{position} must map a key to a tenant name"
                    )
            return parsed
        pairs: dict[str, str] = {}
        for position, item in enumerate(text.split(","), start=1):
            key, sep, tenant = item.strip().partition(":")
            if not sep or not key or not tenant:
                # the entry itself is not echoed: it may be a secret key
                raise ValueError(
                    f"api_keys entry #{position} (comma-separated, counted from 1) is not of "
                    "the form key:tenant"
                )
            pairs[key] = tenant
        return pairs

    @model_validator(mode="after")
    def _heartbeat_period(self) -> Settings:
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be below "
                f"lease_seconds ({self.lease_seconds})"
            )
        if self.heartbeat_seconds >= self.worker_seen_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be below "
                f"worker_seen_seconds ({self.worker_seen_seconds}): a busy worker is seen at "
                "each heartbeat"
            )
        return self


def load_settings(**overrides: Any) -> Settings:
    """``Settings`` from the environment and ``overrides``; a bad value raises ValueError
    with one line per problem, each naming its environment variable (never the value:
    it may be a secret key), for the CLI to print instead of pydantic's traceback."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_input=False, include_url=False):
            field = str(error["loc"][0]) if error["loc"] else ""
            name = "REDIS_URL" if field == "redis_url" else f"INFLUENCE_{field.upper()}"
            where = f"{name}: " if field else ""
            lines.append(f"  {where}{error['msg']}")
        raise ValueError("invalid settings:\n" + "\n".join(lines)) from None
