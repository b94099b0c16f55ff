"""The worker loop (worker.main) on a real Redis with stub handlers: a busy worker stays
alive and keeps its lease through Redis errors, the claim loop survives any Redis error,
a Redis outage during a job neither loses its result nor charges it an attempt, and a
worker whose device is unusable claims nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
import redis
import torch

from tests.worker.conftest import REPO, TENANT, RedisRelay, finished, wait_for
from worker.__main__ import CONFIG_ERROR, DEVICE_FAILURE_EXIT
from worker.__main__ import main as worker_main
from worker.contract import JobKind, JobStatus
from worker.handlers import Outcome
from worker.main import DeviceFailure, run_worker
from worker.queue import JobQueue
from worker.settings import Settings

PAYLOAD = {"model": "ab" * 32, "train": "cd" * 32}
MISSING_GPU = "cuda:99"  # unusable here, with or without CUDA


def slow_job(seconds: float):
    """A stand-in for ``run_job`` that works ``seconds`` without reporting progress."""

    def run(ctx, claim, progress) -> Outcome:
        time.sleep(seconds)
        return Outcome({"slept": seconds})

    return run


def test_a_busy_worker_stays_alive(
    client: redis.Redis, settings: Settings, thread_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = 1.5  # a worker not seen for this long is not alive
    monkeypatch.setattr("worker.main.run_job", slow_job(2 * seen))
    observer = JobQueue(client, settings.model_copy(update={"worker_seen_seconds": seen}))
    job = observer.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    thread_worker("busy", worker_seen_seconds=seen, heartbeat_seconds=0.3)
    wait_for(observer, job, lambda r: r.status == JobStatus.RUNNING)
    running = time.monotonic()  # the worker was last seen by its claim loop before this
    samples = []
    while not observer.get(job).status.terminal:
        samples.append((time.monotonic() - running, observer.workers_alive()))
        time.sleep(0.1)
    assert all(names == ["busy"] for _, names in samples), samples
    # a few samples, some taken when a worker seen only by its claim loop would be gone
    assert len(samples) >= 3 and samples[-1][0] > seen + 0.3, samples
    assert observer.get(job).status == JobStatus.SUCCEEDED


def test_heartbeat_survives_a_redis_error(
    queue: JobQueue, thread_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.main.run_job", slow_job(3.0))
    beat = JobQueue.heartbeat
    calls = []

    def flaky(self: JobQueue, claim) -> bool:
        calls.append(time.time())
        if len(calls) == 1:
            raise redis.TimeoutError("Timeout reading from socket")
        return beat(self, claim)

    monkeypatch.setattr(JobQueue, "heartbeat", flaky)
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    thread_worker("a")
    wait_for(queue, job, lambda r: r.status == JobStatus.RUNNING)
    time.sleep(queue.settings.lease_seconds + 0.6)  # past the lease of a silent worker
    assert queue.claim("thief", block_ms=0) is None  # the lease was renewed all along
    record = wait_for(queue, job, finished, timeout=15)
    assert record.status == JobStatus.SUCCEEDED and record.attempts == 1
    assert len(calls) >= 4


@pytest.mark.parametrize(
    "error",
    [
        redis.ResponseError("READONLY You can't write against a read only replica."),
        redis.TimeoutError("Timeout reading from socket"),
    ],
    ids=["readonly", "timeout"],
)
def test_claim_loop_survives_any_redis_error(
    queue: JobQueue,
    thread_worker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: redis.RedisError,
) -> None:
    monkeypatch.setattr("worker.main.run_job", slow_job(0.0))
    claim = JobQueue.claim
    failures = [error]

    def flaky(self: JobQueue, *args, **kwargs):
        if failures:
            raise failures.pop()
        return claim(self, *args, **kwargs)

    monkeypatch.setattr(JobQueue, "claim", flaky)
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    with caplog.at_level("WARNING", logger="worker"):
        thread_worker()
        record = wait_for(queue, job, finished, timeout=15)
    assert record.status == JobStatus.SUCCEEDED
    assert type(error).__name__ in caplog.text and "retrying in 1 s" in caplog.text


def reporting_job(seconds: float, outage: Callable[[], None] | None = None):
    """A stand-in for ``run_job`` that reports progress every 50 ms for ``seconds``
    (calling ``outage`` once, a third of the way in) and returns."""

    def run(ctx, claim, progress) -> Outcome:
        pending = [outage] if outage is not None else []
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            if pending and elapsed > seconds / 3:
                pending.pop()()
            progress(elapsed / seconds, "working")
            time.sleep(0.05)
        return Outcome({"worked": seconds})

    return run


def outage_of(relay: RedisRelay, seconds: float) -> Callable[[], None]:
    """Cut ``relay`` now and restore it ``seconds`` later (in the background)."""

    def start() -> None:
        relay.cut()
        threading.Timer(seconds, relay.restore).start()

    return start


def test_a_redis_outage_during_a_job_costs_it_nothing(
    queue: JobQueue,
    redis_relay: RedisRelay,
    thread_worker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Redis is cut for 1.5 s in the middle of the computation: the progress reports
    # in that window fail and are skipped, the job goes on and succeeds at attempt 1.
    monkeypatch.setattr("worker.main.run_job", reporting_job(3.0, outage_of(redis_relay, 1.5)))
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    with caplog.at_level("WARNING", logger="worker"):
        thread_worker("relayed", redis_url=redis_relay.url, max_attempts=1)
        record = wait_for(queue, job, finished, timeout=30)
    assert record.status == JobStatus.SUCCEEDED, record.error
    assert record.attempts == 1 and record.result == {"worked": 3.0}
    assert "progress not recorded" in caplog.text


def test_a_result_finished_during_a_redis_outage_is_recorded_when_it_returns(
    queue: JobQueue,
    redis_relay: RedisRelay,
    thread_worker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def cut_before_returning(ctx, claim, progress) -> Outcome:
        outage_of(redis_relay, 2.0)()
        return Outcome({"done": True})

    monkeypatch.setattr("worker.main.run_job", cut_before_returning)
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    with caplog.at_level("WARNING", logger="worker"):
        thread_worker("relayed", redis_url=redis_relay.url, max_attempts=1)
        record = wait_for(queue, job, finished, timeout=30)
    assert record.status == JobStatus.SUCCEEDED and record.result == {"done": True}
    assert record.attempts == 1
    assert "outcome not recorded" in caplog.text


def test_a_job_cut_short_by_redis_runs_again_uncharged(
    queue: JobQueue, thread_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The handler's own Redis read fails on the first attempt (say, loading the model's
    # record): the attempt is released, so with max_attempts = 1 the job still runs again.
    attempts = []

    def reads_redis(ctx, claim, progress) -> Outcome:
        attempts.append(claim.attempt)
        if len(attempts) == 1:
            raise redis.ConnectionError("Error 111 connecting to redis:6379. Connection refused.")
        return Outcome({"attempt": claim.attempt})

    monkeypatch.setattr("worker.main.run_job", reads_redis)
    one_attempt = JobQueue(queue.redis, queue.settings.model_copy(update={"max_attempts": 1}))
    job = one_attempt.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    thread_worker("a", max_attempts=1)
    record = wait_for(queue, job, finished, timeout=15)
    assert record.status == JobStatus.SUCCEEDED and record.result == {"attempt": 2}
    assert attempts == [1, 2] and (record.attempts, record.max_attempts) == (2, 2)


def test_a_redis_error_that_is_no_outage_is_an_ordinary_failure(
    queue: JobQueue, thread_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A retry would meet it again: charged like any failure, not released for ever.
    def wrong_type(ctx, claim, progress) -> Outcome:
        raise redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind")

    monkeypatch.setattr("worker.main.run_job", wrong_type)
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    thread_worker("a")
    record = wait_for(queue, job, finished, timeout=15)
    assert record.status == JobStatus.FAILED and "WRONGTYPE" in record.error
    assert (record.attempts, record.max_attempts) == (3, 3)


def test_a_failed_device_fails_the_job_for_a_retry_and_stops_the_worker(
    queue: JobQueue, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A CUDA error (device-side assert, ECC error...) leaves the process's device context
    # unusable: claiming more jobs there would fail them all.
    def device_assert(ctx, claim, progress) -> Outcome:
        raise torch.AcceleratorError("CUDA error: device-side assert triggered")

    monkeypatch.setattr("worker.main.run_job", device_assert)
    first = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    second = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    stop = threading.Event()
    threading.Timer(10.0, stop.set).start()  # a worker that went on would stop here
    with pytest.raises(DeviceFailure, match="device-side assert"):
        run_worker(settings, name="gpu-0", stop=stop)
    stop.set()
    record = queue.get(first)
    assert record.status == JobStatus.QUEUED and record.attempts == 1
    assert "AcceleratorError" in record.error and "retried elsewhere" in record.error
    assert queue.get(second).attempts == 0  # not claimed by the broken worker


def test_worker_process_exits_for_a_restart_when_its_device_failed(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    def failed(*args, **kwargs) -> None:
        raise DeviceFailure("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr("worker.__main__.run_worker", failed)
    monkeypatch.setenv("REDIS_URL", str(settings.redis_url))
    with pytest.raises(SystemExit) as exit_:
        worker_main([])
    assert exit_.value.code == DEVICE_FAILURE_EXIT not in (0, CONFIG_ERROR)


def test_out_of_memory_drops_the_warm_engines_before_the_retry(
    queue: JobQueue, thread_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    engines = []

    def runs_out(ctx, claim, progress) -> Outcome:
        engines.append(ctx._engines)
        if claim.attempt == 1:
            ctx._engines.get("warm", lambda: "an engine holding device memory")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return Outcome({"cached": len(ctx._engines._items)})

    monkeypatch.setattr("worker.main.run_job", runs_out)
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    thread_worker("a")
    record = wait_for(queue, job, finished, timeout=15)
    assert record.status == JobStatus.SUCCEEDED and record.attempts == 2
    assert record.result == {"cached": 0} and engines[0] is not engines[1]


def test_worker_with_an_unusable_device_claims_nothing(queue: JobQueue, settings) -> None:
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    stop = threading.Event()
    timer = threading.Timer(3.0, stop.set)  # ends a worker that (wrongly) started serving
    timer.start()
    try:
        with pytest.raises(ValueError, match=f"device '{MISSING_GPU}'"):
            run_worker(settings, device=MISSING_GPU, stop=stop, name="gpu-less")
    finally:
        timer.cancel()
    record = queue.get(job)
    assert record.status == JobStatus.QUEUED and record.attempts == 0
    assert queue.workers_alive() == []


def test_worker_process_with_an_unusable_device_exits_with_the_reason(settings) -> None:
    env = {
        **os.environ,
        "REDIS_URL": str(settings.redis_url),
        "INFLUENCE_KEY_PREFIX": settings.key_prefix,
        "INFLUENCE_DEVICE": MISSING_GPU,
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-m", "worker"], cwd=REPO, env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 2
    assert f"INFLUENCE_DEVICE '{MISSING_GPU}'" in done.stderr.decode()


def test_worker_process_with_bad_settings_names_them_without_a_traceback(settings) -> None:
    env = {
        **os.environ,
        "REDIS_URL": str(settings.redis_url),
        "INFLUENCE_KEY_PREFIX": settings.key_prefix,
        "INFLUENCE_MAX_TEST_POINTS": "1000",
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-m", "worker"], cwd=REPO, env=env, capture_output=True, timeout=60
    )
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert "invalid settings" in stderr and "INFLUENCE_MAX_TEST_POINTS" in stderr
    assert "Traceback" not in stderr
