"""The worker process: claim a job, run its handler with a heartbeat renewing the lease,
store the outcome; repeat until stopped (SIGTERM/SIGINT finish the current job first)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import traceback
import uuid
from collections.abc import Callable
from functools import partial

import redis
import torch

from influence import SolverError
from models.training import resolve_device
from worker.handlers import Context, run_job
from worker.queue import (
    REDIS_OUTAGES,
    Claim,
    JobCanceledError,
    JobQueue,
    JobTimeoutError,
    StaleAttemptError,
)
from worker.settings import Settings
from worker.store import ArtifactStore, Registry

__all__ = ["DeviceFailure", "connect", "run_worker"]

log = logging.getLogger("worker")

# Errors that another attempt would meet again: the job fails at once, no retry. Bad
# inputs are checked in the handlers (ValueError naming the field); TypeError and
# IndexError are what slips past such checks into torch, and are as deterministic.
PERMANENT_ERRORS = (ValueError, KeyError, TypeError, IndexError, SolverError, JobTimeoutError)


class DeviceFailure(RuntimeError):
    """The worker's accelerator failed (a CUDA error such as a device-side assert). Such an
    error leaves the process's device context unusable, so the worker records the job's
    failure (retried elsewhere while attempts last) and stops; ``python -m worker`` then
    exits with ``DEVICE_FAILURE_EXIT`` and its supervisor starts a fresh process."""


REDIS_BACKOFF_MIN = 1.0
REDIS_BACKOFF_MAX = 30.0
"""Wait after a Redis error in the claim loop: doubling from the first to the second."""


REDIS_SOCKET_TIMEOUT_S = 5.0
"""Socket (and connect) timeout of every Redis client of the service: a Redis that stops
answering fails a call after this long instead of hanging it (blocking reads here block
for at most a second)."""


def connect(settings: Settings) -> redis.Redis:
    """A Redis client for ``settings.redis_url`` (decoded strings, as the queue expects;
    ``REDIS_SOCKET_TIMEOUT_S``)."""
    if not settings.redis_url:
        raise ValueError(
            "redis_url is not set: give REDIS_URL (the API's `serve` starts an embedded "
            "Redis and passes its URL to its local workers)"
        )
    return redis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S,
    )


def _heartbeat(queue: JobQueue, claim: Claim, done: threading.Event, period: float) -> None:
    """Every ``period`` s until ``done``: renew the claim's lease and mark the worker seen
    (a busy worker stays in ``workers_alive``). A Redis error is logged and the next beat
    tried as usual: the lease outlasts a few missed beats."""
    while not done.wait(period):
        try:
            if not queue.heartbeat(claim):
                log.warning("job %s: attempt %d lost its lease", claim.job_id, claim.attempt)
                return
            queue.seen(claim.consumer)
        except redis.RedisError as exc:
            log.warning("job %s: heartbeat failed (%s); retrying", claim.job_id, exc)


def _until_written(write: Callable[[], object], claim: Claim, stop: threading.Event) -> None:
    """Record a job's outcome, retrying through Redis outages (``REDIS_OUTAGES``; backoff
    doubling from ``REDIS_BACKOFF_MIN`` to ``REDIS_BACKOFF_MAX`` s) so that an outage
    neither loses a finished result nor charges the job an attempt; gives up once ``stop``
    is set (the lease then expires and the job runs again)."""
    backoff = REDIS_BACKOFF_MIN
    while True:
        try:
            write()
            return
        except REDIS_OUTAGES as exc:
            if stop.is_set():
                raise
            log.warning(
                "job %s: outcome not recorded (%s: %s); retrying in %g s",
                claim.job_id,
                type(exc).__name__,
                exc,
                backoff,
            )
            stop.wait(backoff)
            backoff = min(2 * backoff, REDIS_BACKOFF_MAX)


def _settle(queue: JobQueue, ctx: Context, claim: Claim, stop: threading.Event) -> None:
    """Run the job and record how it ended (StaleAttemptError propagates: nothing to
    record). A job cut short by a Redis outage is released: queued again, uncharged; any
    other Redis error is an ordinary failure (retried while attempts last)."""
    write: Callable[[], object]
    try:
        outcome = run_job(ctx, claim, queue.progress_callback(claim))
    except StaleAttemptError:
        raise
    except JobCanceledError:
        write = partial(queue.finish_canceled, claim)
    except REDIS_OUTAGES as exc:
        error = f"Redis unavailable during attempt {claim.attempt} ({type(exc).__name__}: {exc})"
        log.warning("job %s: %s; releasing it", claim.job_id, error)
        write = partial(queue.release, claim, error)
    except torch.AcceleratorError as exc:
        log.error("job %s: the device failed; stopping this worker", claim.job_id, exc_info=True)
        error = f"{type(exc).__name__}: {exc} (the worker's device failed; retried elsewhere)"
        # a stale attempt has nothing to record, but the worker stops all the same
        with contextlib.suppress(StaleAttemptError):
            _until_written(partial(queue.fail, claim, error, retry=True), claim, stop)
        raise DeviceFailure(str(exc)) from exc
    except PERMANENT_ERRORS as exc:
        write = partial(queue.fail, claim, f"{type(exc).__name__}: {exc}", retry=False)
    except torch.OutOfMemoryError as exc:
        ctx.release_memory()
        write = partial(queue.fail, claim, f"{type(exc).__name__}: {exc}", retry=True)
    except Exception as exc:
        log.error("job %s failed:\n%s", claim.job_id, traceback.format_exc())
        write = partial(queue.fail, claim, f"{type(exc).__name__}: {exc}", retry=True)
    else:
        if outcome is None:
            return
        write = partial(queue.complete, claim, outcome.result, outcome.report)
    _until_written(write, claim, stop)


def _run_one(queue: JobQueue, ctx: Context, claim: Claim, stop: threading.Event) -> None:
    done = threading.Event()
    beat = threading.Thread(
        target=_heartbeat,
        args=(queue, claim, done, queue.settings.heartbeat_seconds),
        daemon=True,
    )
    beat.start()
    try:
        _settle(queue, ctx, claim, stop)
    except StaleAttemptError:
        log.warning("job %s: attempt %d is stale; dropping its work", claim.job_id, claim.attempt)
    finally:
        done.set()
        beat.join()


def run_worker(
    settings: Settings,
    *,
    device: str | None = None,
    stop: threading.Event | None = None,
    name: str | None = None,
) -> None:
    """Serve jobs until ``stop`` is set. ``device`` defaults to ``settings.device``; it
    is checked before anything is claimed (ValueError naming the problem, e.g. no CUDA).
    Redis errors (unreachable, timeout, OOM, read-only replica…) are logged and retried
    with a backoff doubling from 1 s to ``REDIS_BACKOFF_MAX`` s. A failed device raises
    :class:`DeviceFailure` after the job's failure is recorded."""
    device = device or settings.device
    resolve_device(device, "device", ValueError)
    stop = stop or threading.Event()
    name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    client = connect(settings)
    queue = JobQueue(client, settings)
    registry = Registry(client, settings, ArtifactStore.for_settings(settings))
    ctx = Context(queue, registry, settings, device)
    log.info("worker %s serving %s on %s", name, settings.key_prefix, ctx.device)
    backoff = REDIS_BACKOFF_MIN
    while not stop.is_set():
        try:
            queue.seen(name)
            claim = queue.claim(name, block_ms=1000)
            if claim is not None:
                log.info("job %s (%s) attempt %d", claim.job_id, claim.job.kind, claim.attempt)
                _run_one(queue, ctx, claim, stop)
            backoff = REDIS_BACKOFF_MIN
        except redis.RedisError as exc:
            log.warning("Redis error (%s: %s); retrying in %g s", type(exc).__name__, exc, backoff)
            stop.wait(backoff)
            backoff = min(2 * backoff, REDIS_BACKOFF_MAX)
    log.info("worker %s stopped", name)
