"""``/jobs``: status, listing, cancellation and a Server-Sent-Events progress stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator

from app.deps import Caller, Svc
from app.schemas import JobList, JobView, meaning_of
from worker.contract import JobKind, JobStatus
from worker.queue import JobRecord

router = APIRouter(prefix="/jobs", tags=["jobs"])

KEEP_ALIVE_MS = 10_000
"""An SSE comment is sent after this long without events, so proxies keep the stream
(counted over polls of ``STOP_POLL_MS``)."""
STOP_POLL_MS = 500
"""How long one XREAD of an idle stream blocks (below the async Redis client's socket
timeout, ``worker.main.REDIS_SOCKET_TIMEOUT_S``); between polls the stream checks whether
the server is shutting down (then it ends, and the dashboard falls back to polling)."""


def job_view(record: JobRecord, *, cached: bool = False) -> JobView:
    """The public view of a job; influence and self-influence jobs link to their ranking
    and score matrix and say what their scores mean (``meaning``; null for other kinds)."""
    view = record.to_dict()
    del view["parent"]
    if record.kind in (JobKind.INFLUENCE, JobKind.SELF_INFLUENCE):
        view["links"] = {
            "ranking": f"/influence/{record.id}/ranking",
            "scores": f"/influence/{record.id}/scores",
        }
        view["meaning"] = (record.result or {}).get("meaning") or meaning_of(record.kind)
    return JobView(**view, cached=cached)


def visible(record: JobRecord | None, job_id: str) -> JobRecord:
    """``record`` (already filtered by tenant), or 404: a missing job, another tenant's and
    an internal shard job look alike."""
    if record is None or record.kind == JobKind.SCORE_SHARD:
        raise HTTPException(404, f"job {job_id} not found")
    return record


def owned_job(services: Svc, tenant: str, job_id: str) -> JobRecord:
    """The caller's job, or 404."""
    return visible(services.queue.get(job_id, tenant), job_id)


@router.get("", response_model=JobList)
def list_jobs(
    services: Svc,
    caller: Caller,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**6)] = 0,
) -> JobList:
    """The caller's jobs, newest first."""
    records = services.queue.list(caller.tenant, status=status, limit=limit, offset=offset)
    return JobList(items=[job_view(r) for r in records])


@router.get("/{job_id}", response_model=JobView)
def get_job(services: Svc, caller: Caller, job_id: str) -> JobView:
    """One of the caller's jobs: status, progress, phase, attempts, error, solver report,
    result and links; 404 for a missing job or another tenant's."""
    return job_view(owned_job(services, caller.tenant, job_id))


@router.delete("/{job_id}", response_model=JobView)
def cancel_job(services: Svc, caller: Caller, job_id: str) -> JobView:
    """Cancel: a queued job at once, a running one when its worker next reports progress
    (watch ``status``). Finished jobs are left as they are."""
    owned_job(services, caller.tenant, job_id)
    record = services.queue.cancel(job_id, caller.tenant)
    if record is None:  # deleted between the two reads
        raise HTTPException(404, f"job {job_id} not found")
    return job_view(record)


def _frame(event: str, event_id: str, view: JobView) -> str:
    """One SSE frame: ``id``, ``event`` and the job view as ``data``."""
    return f"id: {event_id}\nevent: {event}\ndata: {view.model_dump_json()}\n\n"


def _stream_id(value: str | None) -> str | None:
    """A Redis stream id ``<ms>-<seq>`` has two 64-bit unsigned parts."""
    if value is not None and any(int(part) >= 2**64 for part in value.split("-")):
        raise ValueError("a stream id's two parts must each be below 2**64")
    return value


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def job_events(
    services: Svc,
    caller: Caller,
    job_id: str,
    last_event_id: Annotated[
        str | None, Header(pattern=r"^\d{1,20}-\d{1,20}$"), AfterValidator(_stream_id)
    ] = None,
) -> StreamingResponse:
    """Server-Sent Events: ``event: progress`` frames whose ``data`` is the job as
    ``GET /jobs/{id}`` shows it, then one ``event: done`` frame when it is finished (at
    once for a finished job, also when resuming after its last event). Resumes after
    ``Last-Event-ID``; a ``: keep-alive`` comment every 10 s. The API key goes in the
    ``Authorization`` header (read the stream with fetch, not EventSource)."""
    owned_job(services, caller.tenant, job_id)
    keys = services.queue.keys

    async def done_frame(record: JobRecord, after: str) -> str:
        latest = await services.aredis.xrevrange(keys.events(job_id), count=1)
        return _frame("done", latest[0][0] if latest else after, job_view(record))

    async def frames() -> AsyncIterator[str]:
        after = last_event_id or "0-0"
        record: JobRecord | None = await services.job(job_id, caller.tenant)
        quiet_ms = 0
        while record is not None:  # None: expired (result_ttl_seconds) while we watched
            if record.status.terminal:
                # finished: nothing more to wait for (also when resuming after the last event)
                yield await done_frame(record, after)
                return
            if services.stopping.is_set():
                return
            reply = await services.aredis.xread(
                {keys.events(job_id): after}, count=100, block=STOP_POLL_MS
            )
            if not reply:
                quiet_ms += STOP_POLL_MS
                if quiet_ms >= KEEP_ALIVE_MS:
                    quiet_ms = 0
                    record = await services.job(job_id, caller.tenant)
                    yield ": keep-alive\n\n"
                continue
            quiet_ms = 0
            after = reply[0][1][-1][0]
            record = await services.job(job_id, caller.tenant)
            if record is not None and not record.status.terminal:
                yield _frame("progress", after, job_view(record))

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(frames(), media_type="text/event-stream", headers=headers)
