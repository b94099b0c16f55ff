"""The job queue on Redis Streams: at-least-once delivery with leases, fencing, retries,
a dead-letter list, cancellation, monotone progress and an event stream per job.

Design (docs/service-internals.md):

- ``submit`` writes the job hash and XADDs ``{job: id}`` to one stream; every worker
  reads it through one consumer group (XREADGROUP). An entry stays in the group's pending
  list until XACKed, so a worker that dies mid-job leaves it there; once it has been idle
  longer than the lease, another worker takes it with XAUTOCLAIM. Busy workers renew the
  lease by resetting the idle time (XCLAIM … JUSTID) from a heartbeat thread.
- Fencing: each claim increments the job's ``attempts`` inside a Lua script; every later
  write (progress, result, failure, heartbeat) names its attempt and is refused unless it
  equals the current one, so a stale worker cannot overwrite the newer attempt's state.
- Every state change is one Lua script, so the job hash, the per-status counters, the
  stream acknowledgement and the job's event stream change together.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from worker.contract import GROUP, JobKind, JobStatus, Keys, payload_model
from worker.settings import Settings

__all__ = [
    "REDIS_OUTAGES",
    "Claim",
    "JobCanceledError",
    "JobQueue",
    "JobRecord",
    "JobTimeoutError",
    "StaleAttemptError",
]

log = logging.getLogger("worker")

REDIS_OUTAGES = (
    redis.ConnectionError,  # also BusyLoadingError: a restarted Redis loading its data
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a failover in progress: writes reach a replica
    redis.exceptions.OutOfMemoryError,  # maxmemory reached: writes refused for now
)
"""Redis errors that pass with time (Redis unreachable or not taking writes), as opposed
to errors that a retry would meet again (a wrong key type, a script error)."""

EVENTS_MAXLEN = 1000
PRUNE_BATCH = 100
"""Oldest index entries checked for expiry per submit (with ``result_ttl_seconds``), and
the page size of a status-filtered listing."""


class StaleAttemptError(RuntimeError):
    """This worker's attempt was superseded (its lease expired and another worker took over)."""


class JobCanceledError(RuntimeError):
    """The job (or its parent) was canceled; raised from the progress callback to abort."""


class JobTimeoutError(RuntimeError):
    """The attempt ran past the job time limit."""


@dataclass(frozen=True)
class JobRecord:
    """A job's state as stored in its Redis hash. ``attempts`` counts the attempts
    started; ``max_attempts`` is the allowance: the setting at submit plus one for each
    attempt released without charge because Redis was unavailable during it."""

    id: str
    kind: JobKind
    tenant: str
    status: JobStatus
    progress: float
    phase: str
    attempts: int
    max_attempts: int
    error: str | None
    created: float
    started: float | None
    finished: float | None
    payload: dict[str, Any]
    result: dict[str, Any] | None
    report: dict[str, Any] | None
    parent: str | None
    cancel_requested: bool
    cache_key: str | None
    worker: str | None

    @classmethod
    def from_hash(cls, job_id: str, h: dict[str, str]) -> JobRecord:
        """The record of job ``job_id`` from its Redis hash (decoded strings)."""

        def opt_float(name: str) -> float | None:
            return float(h[name]) if h.get(name) else None

        def opt_json(name: str) -> dict[str, Any] | None:
            return json.loads(h[name]) if h.get(name) else None

        return cls(
            id=job_id,
            kind=JobKind(h["kind"]),
            tenant=h["tenant"],
            status=JobStatus(h["status"]),
            progress=float(h.get("progress", 0.0)),
            phase=h.get("phase", ""),
            attempts=int(h.get("attempts", 0)),
            max_attempts=int(h["max_attempts"]) + int(h.get("released", 0)),
            error=h.get("error") or None,
            created=float(h["created"]),
            started=opt_float("started"),
            finished=opt_float("finished"),
            payload=json.loads(h["payload"]),
            result=opt_json("result"),
            report=opt_json("report"),
            parent=h.get("parent") or None,
            cancel_requested=h.get("cancel") == "1",
            cache_key=h.get("cache_key") or None,
            worker=h.get("worker") or None,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe view (what ``GET /jobs/{id}`` shows, before the API adds links)."""
        return {
            "id": self.id,
            "kind": self.kind.value,
            "status": self.status.value,
            "cancel_requested": self.cancel_requested,
            "progress": self.progress,
            "phase": self.phase,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "error": self.error,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "payload": self.payload,
            "result": self.result,
            "report": self.report,
            "parent": self.parent,
            "worker": self.worker,
        }


@dataclass
class Claim:
    """A worker's hold on one attempt of a job; pass it back to every write."""

    job: JobRecord
    attempt: int
    message_id: str
    consumer: str
    deadline: float
    _last_progress: float = field(default=0.0, repr=False)
    _progress_failing: bool = field(default=False, repr=False)

    @property
    def job_id(self) -> str:
        """Id of the claimed job."""
        return self.job.id


# Shared Lua prelude. KEYS layout of every script: 1 job hash, 2 stream, 3 job events,
# 4 dead-letter list, 5 counters hash, 6 the job's shards hash (index -> scores artifact,
# only a sharded influence job has one); ARGV[1] = now. Status changes go through
# set_status so the per-status counters in KEYS[5] stay exact; a finished job's shards
# hash is deleted (nothing reads it once the job is finished: its result was assembled,
# or it failed or was canceled, and SHARD_DONE writes only while the job runs).
_PRELUDE = """
local function set_status(new, job, events, shards)
  job, events, shards = job or KEYS[1], events or KEYS[3], shards or KEYS[6]
  local old = redis.call('HGET', job, 'status')
  if old then redis.call('HINCRBY', KEYS[5], 'status:' .. old, -1) end
  redis.call('HINCRBY', KEYS[5], 'status:' .. new, 1)
  redis.call('HSET', job, 'status', new, 'updated', ARGV[1])
  if new == 'succeeded' or new == 'failed' or new == 'canceled' then
    redis.call('HSET', job, 'finished', ARGV[1])
    redis.call('DEL', shards)
    local ttl = tonumber(redis.call('HGET', job, 'ttl') or '0')
    if ttl > 0 then
      redis.call('EXPIRE', job, ttl)
      redis.call('EXPIRE', events, ttl)
    end
  end
end
local function event(job, events)
  job, events = job or KEYS[1], events or KEYS[3]
  local h = redis.call('HMGET', job, 'status', 'progress', 'phase', 'attempts')
  local data = cjson.encode({status = h[1], progress = tonumber(h[2] or '0'),
    phase = h[3] or '', attempt = tonumber(h[4] or '0'), time = tonumber(ARGV[1])})
  redis.call('XADD', events, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'data', data)
end
-- A shard job that failed for good fails its parent in the same script (KEYS[7] the
-- parent's hash, KEYS[8] its events, KEYS[9] its shards hash; given for shard jobs only).
local function fail_parent(shard, err)
  if not KEYS[9] or redis.call('HGET', KEYS[7], 'status') ~= 'running' then return end
  redis.call('HSET', KEYS[7], 'error', 'shard job ' .. shard .. ' failed: ' .. err)
  set_status('failed', KEYS[7], KEYS[8], KEYS[9])
  event(KEYS[7], KEYS[8])
end
local function ack(group, id)
  redis.call('XACK', KEYS[2], group, id)
  redis.call('XDEL', KEYS[2], id)
end
local function is_terminal(s)
  return s == 'succeeded' or s == 'failed' or s == 'canceled'
end
local function dead_letter(job, err, attempts)
  redis.call('RPUSH', KEYS[4], cjson.encode({job = job,
    kind = redis.call('HGET', KEYS[1], 'kind'), error = err, attempts = attempts,
    time = tonumber(ARGV[1])}))
  redis.call('LTRIM', KEYS[4], -DEAD_LETTER_MAX, -1)
  redis.call('HINCRBY', KEYS[5], 'dead_lettered', 1)
end
""".replace("EVENTS_MAXLEN", str(EVENTS_MAXLEN))

# ARGV: now, fields JSON (flat object), job id; KEYS[7] (optional) = the tenant's job
# index (sorted set by creation time); internal shard jobs are not indexed.
_SUBMIT = """
local fields = cjson.decode(ARGV[2])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
if KEYS[7] then redis.call('ZADD', KEYS[7], ARGV[1], ARGV[3]) end
set_status('queued')
event()
redis.call('XADD', KEYS[2], '*', 'job', ARGV[3])
return 1
"""

# ARGV: now, message id, group, consumer, max attempts, job id; KEYS[7..9]: see fail_parent.
# Returns {'run', attempt} | {'skip', status} | {'dead', attempts} | {'missing'}.
_CLAIM = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then
  ack(ARGV[3], ARGV[2])
  return {'missing'}
end
if is_terminal(st) then
  ack(ARGV[3], ARGV[2])
  return {'skip', st}
end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then
  set_status('canceled')
  event()
  ack(ARGV[3], ARGV[2])
  return {'skip', 'canceled'}
end
local a = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
    - tonumber(redis.call('HGET', KEYS[1], 'released') or '0')
if a >= tonumber(ARGV[5]) then
  local err = redis.call('HGET', KEYS[1], 'error')
  if not err or err == '' then err = 'worker lost during the job' end
  err = err .. ' (gave up after ' .. a .. ' attempts)'
  redis.call('HSET', KEYS[1], 'error', err)
  set_status('failed')
  event()
  dead_letter(ARGV[6], err, a)
  fail_parent(ARGV[6], err)
  ack(ARGV[3], ARGV[2])
  return {'dead', a}
end
a = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'started', ARGV[1], 'worker', ARGV[4], 'message', ARGV[2],
  'phase', 'starting')
set_status('running')
event()
return {'run', a}
"""

# ARGV: now, attempt, group, consumer, message id.  1 = lease renewed, 0 = stale.
_HEARTBEAT = """
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[2]
    or redis.call('HGET', KEYS[1], 'status') ~= 'running' then
  return 0
end
redis.call('XCLAIM', KEYS[2], ARGV[3], ARGV[4], 0, ARGV[5], 'JUSTID')
return 1
"""

# ARGV: now, attempt, fraction, phase; KEYS[7] (optional) = parent job hash.
# 1 = recorded, -1 = stale attempt, -2 = canceled (job or parent).
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[2]
    or redis.call('HGET', KEYS[1], 'status') ~= 'running' then
  return -1
end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return -2 end
if KEYS[7] then
  local ps = redis.call('HGET', KEYS[7], 'status')
  if ps ~= 'running' or redis.call('HGET', KEYS[7], 'cancel') == '1' then return -2 end
end
local p = math.max(tonumber(redis.call('HGET', KEYS[1], 'progress') or '0'), tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'progress', tostring(p), 'phase', ARGV[4], 'updated', ARGV[1])
event()
return 1
"""

# ARGV: now, attempt, group, message id, outcome, result JSON, report JSON, error,
# max attempts, job id, retry flag ('1'/'0').
# outcome 'succeeded' | 'canceled' | 'failed' | 'waiting' (parent handed over to shards)
# | 'released' (requeued without charging the attempt: Redis was unavailable during it).
# KEYS[7..9]: see fail_parent. Returns the status written, or '' when the attempt is
# stale. Writing 'succeeded', 'canceled' or 'failed' again for the same attempt returns
# the status (a reply lost in an outage). A success clears a cancel request it beat.
_FINISH = """
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[2] then return '' end
local outcome = ARGV[5]
local st = redis.call('HGET', KEYS[1], 'status')
if outcome == 'waiting' and st ~= 'running' then
  -- the shards finished (or the job was canceled) before the hand-over was recorded
  ack(ARGV[3], ARGV[4])
  return st
end
if st ~= 'running' then
  if st == outcome and (st == 'succeeded' or st == 'canceled' or st == 'failed') then
    return st
  end
  return ''
end
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'report', ARGV[7]) end
if outcome == 'succeeded' then
  redis.call('HSET', KEYS[1], 'result', ARGV[6], 'progress', '1', 'phase', 'done', 'error', '')
  redis.call('HDEL', KEYS[1], 'cancel')
  set_status('succeeded')
elseif outcome == 'canceled' then
  set_status('canceled')
elseif outcome == 'waiting' then
  redis.call('HSET', KEYS[1], 'phase', 'scoring shards', 'updated', ARGV[1])
elseif outcome == 'released' then
  redis.call('HINCRBY', KEYS[1], 'released', 1)
  redis.call('HSET', KEYS[1], 'error', ARGV[8], 'phase', 'queued')
  set_status('queued')
  redis.call('XADD', KEYS[2], '*', 'job', ARGV[10])
  outcome = 'queued'
else
  redis.call('HSET', KEYS[1], 'error', ARGV[8])
  local a = tonumber(ARGV[2]) - tonumber(redis.call('HGET', KEYS[1], 'released') or '0')
  if ARGV[11] == '1' and a < tonumber(ARGV[9]) then
    redis.call('HSET', KEYS[1], 'phase', 'queued')
    set_status('queued')
    redis.call('XADD', KEYS[2], '*', 'job', ARGV[10])
    outcome = 'queued'
  else
    set_status('failed')
    if ARGV[11] == '1' then dead_letter(ARGV[10], ARGV[8], a) end
    fail_parent(ARGV[10], ARGV[8])
  end
end
event()
ack(ARGV[3], ARGV[4])
return outcome
"""

# ARGV: now. Returns the resulting status ('canceling' while a worker winds down), or
# '' when the job does not exist.
_CANCEL = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return '' end
if st == 'queued' or (st == 'running' and redis.call('HGET', KEYS[1], 'shards_total')) then
  set_status('canceled')
  event()
  return 'canceled'
end
if st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  return 'canceling'
end
return st
"""

# ARGV: now, attempt, shard size, number of training points, test targets JSON. Marks the
# current attempt's job as split into score_shard jobs of that size (fenced), with the
# number of training points and the test targets its assembled result will carry. An
# earlier attempt's split is kept (its shards may still run or have finished).
# Returns the shard size in force, 0 = stale attempt, -2 = cancel requested.
_MARK_SHARDED = """
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[2]
    or redis.call('HGET', KEYS[1], 'status') ~= 'running' then
  return 0
end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return -2 end
local size = redis.call('HGET', KEYS[1], 'shard_size')
if size then return tonumber(size) end
local n = tonumber(ARGV[4])
local total = math.floor((n + tonumber(ARGV[3]) - 1) / tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'shard_size', ARGV[3], 'shards_total', total, 'num_train', ARGV[4],
  'test_targets', ARGV[5])
return tonumber(ARGV[3])
"""

# Parent bookkeeping for sharded jobs (KEYS[6]: its shards hash).
# ARGV: now, shard index, artifact, base fraction, share of the shards.
# Returns the number of finished shards (idempotent per index), or -1 when the parent no
# longer runs (canceled, or already assembled).
_SHARD_DONE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return -1 end
redis.call('HSET', KEYS[6], ARGV[2], ARGV[3])
local done = redis.call('HLEN', KEYS[6])
local total = tonumber(redis.call('HGET', KEYS[1], 'shards_total'))
local p = tonumber(ARGV[4]) + tonumber(ARGV[5]) * done / total
local cur = tonumber(redis.call('HGET', KEYS[1], 'progress') or '0')
redis.call('HSET', KEYS[1], 'progress', tostring(math.max(cur, p)),
  'phase', 'scoring shards ' .. done .. '/' .. total)
event()
return done
"""

# ARGV: now, result JSON. Completes a sharded parent (idempotent: 0 when not running).
_PARENT_COMPLETE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'result', ARGV[2], 'progress', '1', 'phase', 'done', 'error', '')
set_status('succeeded')
event()
return 1
"""

# ARGV: now, error. Fails a sharded parent whose shard failed (0 when not running).
_PARENT_FAIL = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'error', ARGV[2])
set_status('failed')
event()
return 1
"""


class JobQueue:
    """Submit, observe and cancel jobs (API side); claim and finish them (worker side)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        """``client`` must be created with ``decode_responses=True``."""
        self.redis = client
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        prelude = _PRELUDE.replace("DEAD_LETTER_MAX", str(settings.dead_letter_max))
        self._scripts = {
            name: client.register_script(prelude + body)
            for name, body in {
                "submit": _SUBMIT,
                "claim": _CLAIM,
                "heartbeat": _HEARTBEAT,
                "progress": _PROGRESS,
                "finish": _FINISH,
                "cancel": _CANCEL,
                "shard_done": _SHARD_DONE,
                "parent_complete": _PARENT_COMPLETE,
                "parent_fail": _PARENT_FAIL,
                "mark_sharded": _MARK_SHARDED,
            }.items()
        }
        self._group_ready = False

    # -- helpers -----------------------------------------------------------------------

    def _keys_for(self, job_id: str, *extra: str) -> list[str]:
        k = self.keys
        return [
            k.job(job_id),
            k.stream,
            k.events(job_id),
            k.dead_letter,
            k.counters,
            k.shards_done(job_id),
            *extra,
        ]

    def _run(self, name: str, job_id: str, args: list[Any], extra: tuple[str, ...] = ()) -> Any:
        return self._scripts[name](keys=self._keys_for(job_id, *extra), args=[time.time(), *args])

    def ensure_group(self) -> None:
        """Create the stream and its consumer group if missing (idempotent)."""
        if self._group_ready:
            return
        try:
            self.redis.xgroup_create(self.keys.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    # -- API side ----------------------------------------------------------------------

    def submit(
        self,
        kind: JobKind | str,
        payload: dict[str, Any],
        *,
        tenant: str,
        parent: str | None = None,
        cache_key: str | None = None,
    ) -> str:
        """Validate ``payload`` against the kind's schema (``worker.contract``), store the
        job as ``queued`` and enqueue it; returns the job id. Bad payload → ValueError
        (pydantic.ValidationError) naming the field."""
        body = payload_model(kind).model_validate(payload).model_dump(mode="json")
        kind = JobKind(kind)
        self.ensure_group()
        job_id = uuid.uuid4().hex
        now = time.time()
        fields = {
            "kind": kind.value,
            "tenant": tenant,
            "progress": "0",
            "phase": "queued",
            "attempts": "0",
            "max_attempts": str(self.settings.max_attempts),
            "created": repr(now),
            "payload": json.dumps(body, sort_keys=True),
            "parent": parent or "",
            "cache_key": cache_key or "",
            "ttl": str(self.settings.result_ttl_seconds),
        }
        index = () if parent else (self.keys.tenant_jobs(tenant),)
        self._run("submit", job_id, [json.dumps(fields), job_id], index)
        if self.settings.result_ttl_seconds and not parent:
            self._prune_index(tenant, self.redis.zrange(index[0], 0, PRUNE_BATCH - 1))
        return job_id

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """The job, or None if it does not exist or belongs to another tenant."""
        h = self.redis.hgetall(self.keys.job(job_id))
        if not h or (tenant is not None and h.get("tenant") != tenant):
            return None
        return JobRecord.from_hash(job_id, h)

    def list(
        self,
        tenant: str,
        *,
        status: JobStatus | str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[JobRecord]:
        """The tenant's jobs, newest first, optionally only those with ``status``.

        Reads one page of the tenant's index (ZREVRANGE ``offset`` … ``offset+limit``) and
        only those job hashes; with a status filter it reads pages until ``offset+limit``
        matches are found or the index ends. Ids whose job hash expired
        (``result_ttl_seconds``) are dropped from the index as they are met."""
        wanted = JobStatus(status) if status is not None else None
        index = self.keys.tenant_jobs(tenant)
        needed = limit if wanted is None else offset + limit
        start = offset if wanted is None else 0
        records: list[JobRecord] = []
        while len(records) < needed:
            page = needed - len(records) if wanted is None else max(limit, PRUNE_BATCH)
            ids = self.redis.zrevrange(index, start, start + page - 1)
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self.keys.job(job_id))
            expired = []
            for job_id, h in zip(ids, pipe.execute(), strict=True):
                if not h:
                    expired.append(job_id)
                    continue
                if h.get("kind") == JobKind.SCORE_SHARD:  # indexed before shards were not
                    continue
                record = JobRecord.from_hash(job_id, h)
                if wanted is None or record.status == wanted:
                    records.append(record)
            if expired:
                self.redis.zrem(index, *expired)
            start += len(ids) - len(expired)  # the index shifted down by the removed ids
            if len(ids) < page:
                break
        return records if wanted is None else records[offset : offset + limit]

    def _prune_index(self, tenant: str, ids: list[str]) -> None:
        """Drop ids whose job hash has expired from the tenant's index."""
        if not ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(self.keys.job(job_id))
        gone = [i for i, alive in zip(ids, pipe.execute(), strict=True) if not alive]
        if gone:
            self.redis.zrem(self.keys.tenant_jobs(tenant), *gone)

    def cancel(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """Cancel: a queued job (or one waiting on shards) becomes ``canceled`` at once; a
        running one gets a cancel flag that its worker sees at the next progress report.
        Finished jobs are left as they are. Returns the job after the request (None if it
        does not exist for this tenant)."""
        if self.get(job_id, tenant) is None:
            return None
        self._run("cancel", job_id, [])
        return self.get(job_id, tenant)

    def events(
        self, job_id: str, after: str = "0-0", *, block_ms: int | None = None, count: int = 100
    ) -> list[tuple[str, dict[str, Any]]]:
        """Progress/status events of a job after event id ``after`` (``"0-0"``: from the
        start), as (event id, {status, progress, phase, attempt, time}); blocks up to
        ``block_ms`` for new ones when given."""
        reply = self.redis.xread({self.keys.events(job_id): after}, count=count, block=block_ms)
        if not reply:
            return []
        return [(eid, json.loads(fields["data"])) for eid, fields in reply[0][1]]

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """Entries of the dead-letter list, oldest first: {job, kind, error, attempts, time}."""
        return [json.loads(e) for e in self.redis.lrange(self.keys.dead_letter, 0, limit - 1)]

    def counts(self) -> dict[str, int]:
        """Jobs by status (all tenants) plus counters (``dead_lettered``, cache hits…)."""
        raw = self.redis.hgetall(self.keys.counters)
        counts = {s.value: 0 for s in JobStatus}
        for name, value in raw.items():
            key = name.removeprefix("status:")
            counts[key] = int(value)
        return counts

    def depth(self) -> int:
        """Jobs waiting for a worker (status ``queued``)."""
        return self.counts()[JobStatus.QUEUED.value]

    def workers_alive(self) -> list[str]:
        """Names of workers seen within ``settings.worker_seen_seconds`` (workers not seen
        for longer are removed from the set)."""
        since = self._prune_workers()
        return list(self.redis.zrangebyscore(self.keys.workers, since, "+inf"))

    def _prune_workers(self) -> float:
        """Drop workers not seen within ``worker_seen_seconds`` (stopped or dead ones, which
        would otherwise stay in the set forever); returns the cut-off time."""
        since = time.time() - self.settings.worker_seen_seconds
        self.redis.zremrangebyscore(self.keys.workers, "-inf", f"({since!r}")
        return since

    def incr_counter(self, name: str, amount: int = 1) -> None:
        """Bump a metrics counter (e.g. ``cache_hits``)."""
        self.redis.hincrby(self.keys.counters, name, amount)

    # -- worker side -------------------------------------------------------------------

    def seen(self, worker: str) -> None:
        """Record that ``worker`` is alive (``workers_alive``); drops workers not seen
        within ``worker_seen_seconds``."""
        self.redis.zadd(self.keys.workers, {worker: time.time()})
        self._prune_workers()

    def claim(self, consumer: str, *, block_ms: int = 1000) -> Claim | None:
        """Take the next job: first one whose lease expired (XAUTOCLAIM, min-idle = lease),
        else a new one (XREADGROUP, waiting up to ``block_ms``; 0: no wait). Increments
        ``attempts`` (the fencing token). Jobs already finished or canceled are acknowledged
        and skipped; a job out of attempts goes to the dead-letter list. None when nothing
        came."""
        self.ensure_group()
        lease_ms = int(self.settings.lease_seconds * 1000)
        try:
            _, messages, *_ = self.redis.xautoclaim(
                self.keys.stream, GROUP, consumer, lease_ms, "0-0", count=1
            )
            if not messages:
                reply = self.redis.xreadgroup(
                    GROUP, consumer, {self.keys.stream: ">"}, count=1, block=block_ms or None
                )
                messages = reply[0][1] if reply else []
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._group_ready = False  # Redis lost its data: recreate the group next time
            return None
        for message_id, fields in messages:
            if fields is None:  # entry trimmed from the stream: nothing to run
                self.redis.xack(self.keys.stream, GROUP, message_id)
                continue
            job_id = fields["job"]
            parent = self.redis.hget(self.keys.job(job_id), "parent")  # fixed at submit
            outcome = self._run(
                "claim",
                job_id,
                [message_id, GROUP, consumer, self.settings.max_attempts, job_id],
                self._parent_keys(parent),
            )
            if outcome[0] != "run":
                continue
            record = self.get(job_id)
            assert record is not None  # the claim script just saw the hash
            return Claim(
                job=record,
                attempt=int(outcome[1]),
                message_id=message_id,
                consumer=consumer,
                deadline=time.time() + self.settings.job_time_limit_seconds,
            )
        return None

    def heartbeat(self, claim: Claim) -> bool:
        """Renew the lease of ``claim``; False when the attempt is stale (stop working)."""
        return bool(
            self._run(
                "heartbeat",
                claim.job_id,
                [claim.attempt, GROUP, claim.consumer, claim.message_id],
            )
        )

    def progress_callback(self, claim: Claim, *, min_interval: float = 0.1) -> Callable:
        """A ``progress(fraction, phase)`` callback for the engine: records monotone progress
        (at most every ``min_interval`` s, always for fraction 1) and raises
        JobCanceledError / StaleAttemptError / JobTimeoutError to abort the computation.
        A Redis outage (``REDIS_OUTAGES``) skips that report (logged once per outage):
        progress is not worth losing the computation for, and the next report tries again."""

        def progress(fraction: float, phase: str) -> None:
            now = time.time()
            if now > claim.deadline:
                raise JobTimeoutError(
                    f"time limit of {self.settings.job_time_limit_seconds:g} s exceeded"
                )
            if fraction < 1.0 and now - claim._last_progress < min_interval:
                return
            claim._last_progress = now
            try:
                self.report_progress(claim, fraction, phase)
            except REDIS_OUTAGES as exc:
                if not claim._progress_failing:
                    log.warning("job %s: progress not recorded (%s); going on", claim.job_id, exc)
                claim._progress_failing = True
            else:
                claim._progress_failing = False

        return progress

    def report_progress(self, claim: Claim, fraction: float, phase: str) -> None:
        """Record progress now (never lowers the stored value). Raises StaleAttemptError or
        JobCanceledError (job or, for a shard, its parent canceled)."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress fraction must be in [0, 1], got {fraction}")
        parent = (self.keys.job(claim.job.parent),) if claim.job.parent else ()
        code = self._run("progress", claim.job_id, [claim.attempt, fraction, phase], parent)
        if code == -1:
            raise StaleAttemptError(f"job {claim.job_id}: attempt {claim.attempt} is stale")
        if code == -2:
            raise JobCanceledError(f"job {claim.job_id} was canceled")

    def _finish(
        self,
        claim: Claim,
        outcome: str,
        *,
        result: dict[str, Any] | None = None,
        report: dict[str, Any] | None = None,
        error: str = "",
        retry: bool = False,
    ) -> str:
        written = self._run(
            "finish",
            claim.job_id,
            [
                claim.attempt,
                GROUP,
                claim.message_id,
                outcome,
                json.dumps(result) if result is not None else "",
                json.dumps(report) if report is not None else "",
                error,
                self.settings.max_attempts,
                claim.job_id,
                "1" if retry else "0",
            ],
            self._parent_keys(claim.job.parent),
        )
        if not written:
            raise StaleAttemptError(f"job {claim.job_id}: attempt {claim.attempt} is stale")
        if outcome == "succeeded" and claim.job.cache_key and result is not None:
            self.set_cached(claim.job.tenant, claim.job.cache_key, claim.job_id)
        return written

    def complete(
        self, claim: Claim, result: dict[str, Any], report: dict[str, Any] | None = None
    ) -> None:
        """Store the result (and solver report) and mark the job ``succeeded``; raises
        StaleAttemptError, writing nothing, when ``claim`` is not the current attempt."""
        self._finish(claim, "succeeded", result=result, report=report)

    def fail(self, claim: Claim, error: str, *, retry: bool) -> JobStatus:
        """Record a failed attempt. With ``retry`` and attempts left the job is queued again;
        with ``retry`` and none left it goes to the dead-letter list; without ``retry``
        (bad input, time limit) it fails at once; a shard job that fails for good fails its
        parent too (in the same Redis script). Returns the new status."""
        return JobStatus(self._finish(claim, "failed", error=error, retry=retry))

    def finish_canceled(self, claim: Claim) -> None:
        """Mark a job whose worker saw the cancel flag as ``canceled``."""
        self._finish(claim, "canceled")

    def release(self, claim: Claim, error: str) -> None:
        """Queue the job again after its attempt was cut short by Redis being unavailable,
        without charging that attempt against ``max_attempts`` (the job's allowance grows
        by one); ``error`` is recorded as the job's last error."""
        self._finish(claim, "released", error=error)

    def mark_sharded(
        self, claim: Claim, shard_size: int, num_train: int, test_targets: list[Any]
    ) -> int:
        """Record that the job's ``num_train`` training points are scored in score_shard
        jobs of ``shard_size`` (before submitting them, so a fast shard finds the total),
        with the ``test_targets`` that the assembled result carries (so assembling needs no
        test set). An earlier attempt's split is kept, so shards of both attempts agree:
        returns the shard size in force. Raises StaleAttemptError, or JobCanceledError when
        a cancel was requested (a running job without shards only gets the flag)."""
        args = [claim.attempt, shard_size, num_train, json.dumps(test_targets)]
        size = int(self._run("mark_sharded", claim.job_id, args))
        if size == -2:
            raise JobCanceledError(f"job {claim.job_id} was canceled")
        if size == 0:
            raise StaleAttemptError(f"job {claim.job_id}: attempt {claim.attempt} is stale")
        return size

    def recorded_shard_size(self, job_id: str) -> int | None:
        """The shard size an earlier attempt of ``job_id`` split it with (None: none did)."""
        raw = self.redis.hget(self.keys.job(job_id), "shard_size")
        return int(raw) if raw else None

    def shard_test_targets(self, parent: str) -> list[Any] | None:
        """The test targets recorded by ``mark_sharded`` (None: not recorded, e.g. a job
        handed over by an older worker)."""
        raw = self.redis.hget(self.keys.job(parent), "test_targets")
        return json.loads(raw) if raw else None

    def hand_over_to_shards(self, claim: Claim, report: dict[str, Any] | None) -> None:
        """End the parent's attempt: it stays ``running`` (phase "scoring shards") until its
        shards are done; its stream entry is acknowledged; ``report`` is stored."""
        self._finish(claim, "waiting", report=report)

    def shard_done(
        self, parent: str, index: int, artifact: str, *, base: float, share: float
    ) -> int:
        """Record shard ``index`` of ``parent`` as done with its scores ``artifact``
        (idempotent) and raise the parent's progress to ``base + share * done/total``.
        Returns the number of finished shards, or -1 when the parent no longer runs."""
        return int(
            self._run(
                "shard_done",
                parent,
                [index, artifact, base, share],
            )
        )

    def _parent_keys(self, parent: str | None) -> tuple[str, ...]:
        """A shard job's parent keys for the scripts' ``fail_parent`` (none without one)."""
        if not parent:
            return ()
        return self.keys.job(parent), self.keys.events(parent), self.keys.shards_done(parent)

    def fail_parent(self, parent: str, error: str) -> bool:
        """Fail a sharded parent that cannot be assembled (False when it no longer runs)."""
        return bool(self._run("parent_fail", parent, [error]))

    def shard_num_train(self, parent: str) -> int | None:
        """The number of training points recorded by ``mark_sharded`` (None: not recorded)."""
        raw = self.redis.hget(self.keys.job(parent), "num_train")
        return int(raw) if raw else None

    def shards_total(self, parent: str) -> int:
        """Number of shard jobs ``parent`` was split into (0: not sharded)."""
        return int(self.redis.hget(self.keys.job(parent), "shards_total") or 0)

    def shard_results(self, parent: str) -> dict[int, str]:
        """Finished shards of ``parent``: index → scores artifact id."""
        raw = self.redis.hgetall(self.keys.shards_done(parent))
        return {int(i): a for i, a in raw.items()}

    def complete_parent(self, parent: str, result: dict[str, Any]) -> bool:
        """Mark a sharded parent ``succeeded`` with its assembled result (idempotent: False
        when it already finished or was canceled). Its report was stored at hand-over."""
        done = bool(self._run("parent_complete", parent, [json.dumps(result)]))
        if done:
            record = self.get(parent)
            if record is not None and record.cache_key:
                self.set_cached(record.tenant, record.cache_key, parent)
        return done

    # -- result cache links -------------------------------------------------------------

    def set_cached(self, tenant: str, cache_key: str, job_id: str) -> None:
        """Remember that the tenant's job ``job_id`` answers query ``cache_key``."""
        ttl = self.settings.cache_ttl_seconds or None
        self.redis.set(self.keys.result_cache(tenant, cache_key), job_id, ex=ttl)

    def cached_job(
        self, tenant: str, cache_key: str, usable: Callable[[JobRecord], bool] | None = None
    ) -> JobRecord | None:
        """The tenant's succeeded job for ``cache_key``, if any (no worker involved) and
        ``usable`` accepts it (e.g. its result files are still there); counts a cache hit
        or miss."""
        job_id = self.redis.get(self.keys.result_cache(tenant, cache_key))
        if job_id is None:
            self.incr_counter("cache_misses")
            return None
        record = self.get(job_id, tenant)
        if (
            record is None
            or record.status != JobStatus.SUCCEEDED
            or (usable is not None and not usable(record))
        ):
            self.incr_counter("cache_misses")
            return None
        self.incr_counter("cache_hits")
        return record
