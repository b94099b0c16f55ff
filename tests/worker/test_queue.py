"""Queue semantics against a real Redis, driven directly (no handlers): leases and fencing,
retries and the dead-letter list, cancellation, monotone progress, cached-result links."""

from __future__ import annotations

import time

import pydantic
import pytest
import redis

from tests.worker.conftest import TENANT
from worker.contract import GROUP, JobKind, JobStatus
from worker.queue import (
    JobCanceledError,
    JobQueue,
    JobTimeoutError,
    StaleAttemptError,
)
from worker.settings import Settings

PAYLOAD = {"model": "ab" * 32, "train": "cd" * 32}


# Leases for tests that also assert a lease is *still held*: the held-lease checks run well
# within it even on a busy machine. Tests that only wait for a lease to run out use 0.3 s:
# they sleep past it, so a slow machine only makes them wait longer.
HELD_LEASE = 1.5


def short_lease(
    client: redis.Redis, settings: Settings, lease: float = 0.3, **extra: float
) -> JobQueue:
    update = {"lease_seconds": lease, "heartbeat_seconds": lease / 3, **extra}
    return JobQueue(client, settings.model_copy(update=update))


def test_submit_claim_complete_round_trip(queue: JobQueue) -> None:
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    record = queue.get(job, TENANT)
    assert record is not None and record.status == JobStatus.QUEUED and record.attempts == 0
    assert queue.get(job, "someone-else") is None
    assert queue.depth() == 1

    claim = queue.claim("w1", block_ms=100)
    assert claim is not None and claim.job_id == job and claim.attempt == 1
    assert (queue.get(job).status, queue.get(job).phase) == (JobStatus.RUNNING, "starting")
    queue.complete(claim, {"answer": 42}, {"iterations": 3})

    record = queue.get(job, TENANT)
    assert record.status == JobStatus.SUCCEEDED
    assert (record.result, record.report, record.progress) == (
        {"answer": 42},
        {"iterations": 3},
        1.0,
    )
    assert queue.claim("w1", block_ms=50) is None
    assert queue.counts()["succeeded"] == 1 and queue.depth() == 0
    pending = queue.redis.xpending(queue.keys.stream, GROUP)
    assert pending["pending"] == 0
    assert [r.id for r in queue.list(TENANT)] == [job]


def test_bad_payload_is_refused_naming_the_field(queue: JobQueue) -> None:
    with pytest.raises(pydantic.ValidationError, match="damping"):
        queue.submit(JobKind.SELF_INFLUENCE, {**PAYLOAD, "damping": -1.0}, tenant=TENANT)
    with pytest.raises(ValueError, match="unknown job kind"):
        queue.submit("train_gpt", PAYLOAD, tenant=TENANT)
    assert queue.counts()["queued"] == 0


def test_expired_lease_is_taken_over_and_the_stale_attempt_cannot_write(
    client: redis.Redis, settings: Settings
) -> None:
    queue = short_lease(client, settings, lease=HELD_LEASE)
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    stale = queue.claim("dead-worker", block_ms=100)
    assert stale is not None
    queue.report_progress(stale, 0.4, "s_test")  # progress alone does not renew the lease
    assert queue.claim("other", block_ms=50) is None  # lease still held
    time.sleep(HELD_LEASE + 0.2)
    fresh = queue.claim("other", block_ms=100)
    assert fresh is not None and fresh.job_id == job and fresh.attempt == 2

    with pytest.raises(StaleAttemptError):
        queue.complete(stale, {"from": "stale"})
    with pytest.raises(StaleAttemptError):
        queue.report_progress(stale, 0.9, "scoring")
    assert not queue.heartbeat(stale)
    assert queue.heartbeat(fresh)

    queue.complete(fresh, {"from": "fresh"})
    record = queue.get(job)
    assert record.status == JobStatus.SUCCEEDED and record.attempts == 2
    assert record.result == {"from": "fresh"}
    with pytest.raises(StaleAttemptError):
        queue.fail(stale, "late failure", retry=True)
    assert queue.get(job).result == {"from": "fresh"} and queue.counts()["succeeded"] == 1


def test_heartbeat_keeps_the_lease(client: redis.Redis, settings: Settings) -> None:
    queue = short_lease(client, settings, lease=HELD_LEASE)
    queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    claim = queue.claim("busy", block_ms=100)
    start = time.monotonic()
    for _ in range(8):  # a beat every 0.3 s for 2.4 s: well past one lease without a renewal
        time.sleep(0.3)
        assert queue.claim("thief", block_ms=0) is None  # 0.3 s since the last renewal
        assert queue.heartbeat(claim)
    assert time.monotonic() - start > HELD_LEASE + 0.5
    queue.complete(claim, {})
    assert queue.get(claim.job_id).attempts == 1


def test_failing_job_is_retried_then_dead_lettered_while_others_flow(queue: JobQueue) -> None:
    poison = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    good = queue.submit(JobKind.SELF_INFLUENCE, {**PAYLOAD, "damping": 0.1}, tenant=TENANT)
    seen = []
    while (claim := queue.claim("w", block_ms=50)) is not None:
        seen.append(claim.job_id)
        if claim.job_id == poison:
            queue.fail(claim, f"RuntimeError: boom {claim.attempt}", retry=True)
        else:
            queue.complete(claim, {"ok": True})
    assert seen.count(poison) == 3 and seen.count(good) == 1
    record = queue.get(poison)
    assert record.status == JobStatus.FAILED and record.attempts == 3
    assert record.error == "RuntimeError: boom 3"
    assert queue.get(good).status == JobStatus.SUCCEEDED
    (dead,) = queue.dead_letters()
    assert dead["job"] == poison and dead["attempts"] == 3 and "boom 3" in dead["error"]
    assert queue.counts()["dead_lettered"] == 1


def test_permanent_failure_is_not_retried(queue: JobQueue) -> None:
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    claim = queue.claim("w", block_ms=50)
    assert queue.fail(claim, "ValueError: bad input", retry=False) == JobStatus.FAILED
    assert queue.claim("w", block_ms=50) is None
    assert queue.get(job).attempts == 1 and queue.dead_letters() == []


def test_job_whose_workers_keep_dying_is_dead_lettered(
    client: redis.Redis, settings: Settings
) -> None:
    queue = short_lease(client, settings)
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    for attempt in (1, 2, 3):
        claim = queue.claim(f"crashing-{attempt}", block_ms=100)
        assert claim is not None and claim.attempt == attempt
        time.sleep(0.4)  # the worker dies: no heartbeat, no result
    assert queue.claim("survivor", block_ms=100) is None
    record = queue.get(job)
    assert record.status == JobStatus.FAILED and record.attempts == 3
    assert "gave up after 3 attempts" in record.error
    assert [d["job"] for d in queue.dead_letters()] == [job]


def test_a_released_attempt_is_not_charged(client: redis.Redis, settings: Settings) -> None:
    # max_attempts = 2: attempt 1 released (Redis was down during it), attempts 2 and 3
    # fail and are charged; the job is dead-lettered after 2 charged attempts, not 3.
    queue = short_lease(client, settings, max_attempts=2)
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    first = queue.claim("w", block_ms=50)
    queue.release(first, "Redis unavailable during attempt 1 (ConnectionError: refused)")
    record = queue.get(job)
    assert record.status == JobStatus.QUEUED and (record.attempts, record.max_attempts) == (1, 3)
    assert record.phase == "queued"
    assert record.error.startswith("Redis unavailable during attempt 1")
    with pytest.raises(StaleAttemptError):  # the released attempt cannot write any more
        queue.complete(first, {"late": True})
    second = queue.claim("w", block_ms=50)
    assert second.attempt == 2
    queue.report_progress(second, 0.5, "scoring")
    assert queue.fail(second, "RuntimeError: boom 2", retry=True) == JobStatus.QUEUED
    assert queue.get(job).phase == "queued"  # not the failed attempt's last phase
    third = queue.claim("w", block_ms=50)
    assert third.attempt == 3
    assert queue.fail(third, "RuntimeError: boom 3", retry=True) == JobStatus.FAILED
    (dead,) = queue.dead_letters()
    assert dead["job"] == job and dead["attempts"] == 2
    # a worker lost during a released job's last charged attempt: gave up at claim
    lost = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    queue.release(queue.claim("w", block_ms=50), "Redis unavailable")
    for attempt in (2, 3):
        assert queue.claim(f"dying-{attempt}", block_ms=100).attempt == attempt
        time.sleep(0.4)
    assert queue.claim("survivor", block_ms=100) is None
    assert "gave up after 2 attempts" in queue.get(lost).error


def test_an_outcome_written_twice_by_its_attempt_is_kept(queue: JobQueue) -> None:
    # A reply lost in a Redis outage makes the worker write its outcome again.
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    claim = queue.claim("w", block_ms=50)
    queue.complete(claim, {"answer": 1})
    queue.complete(claim, {"answer": 1})
    record = queue.get(job)
    assert record.status == JobStatus.SUCCEEDED and record.result == {"answer": 1}
    assert queue.counts()["succeeded"] == 1
    with pytest.raises(StaleAttemptError):  # but not a different outcome
        queue.fail(claim, "RuntimeError: late", retry=True)
    canceled = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    claim = queue.claim("w", block_ms=50)
    queue.finish_canceled(claim)
    queue.finish_canceled(claim)
    assert queue.get(canceled).status == JobStatus.CANCELED
    assert queue.counts()["canceled"] == 1
    failed = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    claim = queue.claim("w", block_ms=50)
    assert queue.fail(claim, "ValueError: bad", retry=False) == JobStatus.FAILED
    assert queue.fail(claim, "ValueError: bad", retry=False) == JobStatus.FAILED
    assert queue.get(failed).status == JobStatus.FAILED and queue.counts()["failed"] == 1


def test_cancel_queued_job_is_never_run(queue: JobQueue) -> None:
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    assert queue.cancel(job, "someone-else") is None
    assert queue.cancel(job, TENANT).status == JobStatus.CANCELED
    assert queue.claim("w", block_ms=50) is None
    assert queue.get(job).attempts == 0
    assert queue.redis.xpending(queue.keys.stream, GROUP)["pending"] == 0


def test_a_job_asked_to_cancel_whose_worker_died_is_not_run_again(
    client: redis.Redis, settings: Settings
) -> None:
    queue = short_lease(client, settings)
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    assert queue.claim("dies", block_ms=100) is not None
    assert queue.cancel(job, TENANT).cancel_requested  # running: the flag only
    time.sleep(0.4)  # the worker dies before its next progress report: the lease expires
    assert queue.claim("survivor", block_ms=100) is None  # canceled at claim, not re-run
    record = queue.get(job)
    assert record.status == JobStatus.CANCELED and record.attempts == 1
    assert queue.redis.xpending(queue.keys.stream, GROUP)["pending"] == 0


def test_cancel_running_job_aborts_at_next_progress(queue: JobQueue) -> None:
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    claim = queue.claim("w", block_ms=50)
    record = queue.cancel(job, TENANT)
    assert record.status == JobStatus.RUNNING and record.cancel_requested
    with pytest.raises(JobCanceledError):
        queue.report_progress(claim, 0.5, "scoring")
    queue.finish_canceled(claim)
    assert queue.get(job).status == JobStatus.CANCELED
    assert queue.cancel(job, TENANT).status == JobStatus.CANCELED  # finished: left alone


def test_progress_never_goes_backwards_and_events_record_it(queue: JobQueue) -> None:
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    claim = queue.claim("w", block_ms=50)
    for fraction in (0.2, 0.6, 0.3, 0.7, 0.1):
        queue.report_progress(claim, fraction, f"phase {fraction}")
    record = queue.get(job)
    assert record.progress == 0.7 and record.phase == "phase 0.1"
    with pytest.raises(ValueError, match="fraction"):
        queue.report_progress(claim, 1.5, "x")
    queue.complete(claim, {})
    events = [e for _, e in queue.events(job)]
    statuses = [e["status"] for e in events]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded"
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress) and progress[-1] == 1.0
    last_id = queue.events(job)[-1][0]
    assert queue.events(job, after=last_id) == []


def test_time_limit_aborts_through_the_progress_callback(
    client: redis.Redis, settings: Settings
) -> None:
    queue = short_lease(client, settings, job_time_limit_seconds=1.0)
    queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    claim = queue.claim("w", block_ms=50)
    progress = queue.progress_callback(claim)
    progress(0.1, "start")  # well within the limit, even on a busy machine
    time.sleep(1.1)
    with pytest.raises(JobTimeoutError, match="time limit"):
        progress(0.2, "later")


def test_succeeded_job_with_cache_key_is_found_by_cached_job(queue: JobQueue) -> None:
    assert queue.cached_job(TENANT, "k" * 64) is None
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT, cache_key="k" * 64)
    assert queue.cached_job(TENANT, "k" * 64) is None  # not finished yet
    queue.complete(queue.claim("w", block_ms=50), {"scores": "x"})
    hit = queue.cached_job(TENANT, "k" * 64)
    assert hit is not None and hit.id == job and hit.result == {"scores": "x"}
    assert queue.cached_job("other-tenant", "k" * 64) is None
    counts = queue.counts()
    assert (counts["cache_hits"], counts["cache_misses"]) == (1, 3)


def test_workers_alive(queue: JobQueue) -> None:
    queue.seen("w-1")
    assert queue.workers_alive() == ["w-1"]


def test_stale_workers_are_pruned_from_the_set(queue: JobQueue) -> None:
    old = time.time() - queue.settings.worker_seen_seconds - 5
    queue.redis.zadd(queue.keys.workers, {"gone-1": old, "gone-2": old})
    queue.seen("w-1")  # a live worker's beat prunes the stale ones
    assert queue.redis.zrange(queue.keys.workers, 0, -1) == ["w-1"]
    queue.redis.zadd(queue.keys.workers, {"gone-3": old})
    assert queue.workers_alive() == ["w-1"]  # and so does reading liveness
    assert queue.redis.zrange(queue.keys.workers, 0, -1) == ["w-1"]


def test_finished_jobs_expire_after_the_result_ttl(client: redis.Redis, settings: Settings) -> None:
    queue = short_lease(client, settings, result_ttl_seconds=60)
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    assert client.ttl(queue.keys.job(job)) == -1  # no expiry while it is alive
    queue.complete(queue.claim("w", block_ms=50), {})
    assert 0 < client.ttl(queue.keys.job(job)) <= 60
    assert 0 < client.ttl(queue.keys.events(job)) <= 60


def test_queue_recovers_when_redis_lost_its_stream(queue: JobQueue) -> None:
    queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    queue.redis.delete(queue.keys.stream)  # e.g. a Redis restarted without persistence
    assert queue.claim("w", block_ms=50) is None
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    claim = queue.claim("w", block_ms=50)
    assert claim is not None and claim.job_id == job


def sharded_parent(queue: JobQueue, shards: int) -> tuple[str, list[str]]:
    """A parent job handed over to ``shards`` score_shard jobs (as the influence handler does)."""
    parent = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    claim = queue.claim("w", block_ms=50)
    assert queue.mark_sharded(claim, 1, shards, [1, 2]) == 1  # one training point per shard
    shard_payload = {**PAYLOAD, "parent": parent, "start": 0, "stop": 1, "s_test": "ef" * 32}
    children = [
        queue.submit(
            JobKind.SCORE_SHARD, {**shard_payload, "index": i}, tenant=TENANT, parent=parent
        )
        for i in range(shards)
    ]
    queue.hand_over_to_shards(claim, {"method": "exact"})
    return parent, children


def test_shards_complete_the_parent_once(queue: JobQueue) -> None:
    parent, _ = sharded_parent(queue, 2)
    record = queue.get(parent)
    assert record.status == JobStatus.RUNNING and record.phase == "scoring shards"
    assert queue.shard_done(parent, 1, "b" * 64, base=0.5, share=0.5) == 1
    assert queue.get(parent).progress == 0.75
    assert queue.shard_done(parent, 1, "b" * 64, base=0.5, share=0.5) == 1  # a retried shard
    assert queue.shard_done(parent, 0, "a" * 64, base=0.5, share=0.5) == 2
    assert queue.shard_results(parent) == {0: "a" * 64, 1: "b" * 64}
    assert queue.shard_test_targets(parent) == [1, 2]
    assert queue.complete_parent(parent, {"scores": "c" * 64})
    assert not queue.redis.exists(queue.keys.shards_done(parent))  # no leftover hash
    assert not queue.complete_parent(parent, {"scores": "other"})
    record = queue.get(parent)
    assert record.status == JobStatus.SUCCEEDED and record.result == {"scores": "c" * 64}
    assert record.report == {"method": "exact"} and record.attempts == 1
    assert queue.shard_done(parent, 0, "a" * 64, base=0.5, share=0.5) == -1


def test_a_failed_shard_fails_its_parent(queue: JobQueue) -> None:
    parent, children = sharded_parent(queue, 2)
    claim = queue.claim("w", block_ms=50)
    assert claim.job_id == children[0] and claim.job.parent == parent
    queue.fail(claim, "ValueError: bad rows", retry=False)
    record = queue.get(parent)
    assert record.status == JobStatus.FAILED and "bad rows" in record.error
    assert children[0] in record.error
    assert not queue.redis.exists(queue.keys.shards_done(parent))


def test_a_shard_failure_whose_reply_was_lost_has_failed_the_parent_already(
    queue: JobQueue,
) -> None:
    """The shard's failure and its parent's are one script: a worker whose reply was lost
    (or that died right after) cannot leave the parent running for ever; its retry of
    the write is accepted."""
    parent, children = sharded_parent(queue, 2)
    claim = queue.claim("w", block_ms=50)
    assert claim.job_id == children[0]
    queue._finish(claim, "failed", error="ValueError: bad rows")  # written; the reply lost
    record = queue.get(parent)
    assert record.status == JobStatus.FAILED and "bad rows" in record.error
    assert queue.fail(claim, "ValueError: bad rows", retry=False) == JobStatus.FAILED
    assert queue.counts()["failed"] == 2  # the shard and its parent, once each


def test_a_cancel_requested_before_the_hand_over_cancels_the_job(queue: JobQueue) -> None:
    """A cancel that arrives after the parent's last progress report and before it records
    its shards only sets the flag (no shards yet): recording them then refuses, so the
    worker finishes the job canceled instead of handing it to shards that all cancel."""
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    claim = queue.claim("w", block_ms=50)
    assert queue.cancel(job, TENANT).cancel_requested
    with pytest.raises(JobCanceledError):
        queue.mark_sharded(claim, 1, 2, [1])
    assert queue.shards_total(job) == 0
    queue.finish_canceled(claim)
    assert queue.get(job).status == JobStatus.CANCELED


def test_a_retried_parent_keeps_the_split_of_its_first_attempt(
    client: redis.Redis, settings: Settings
) -> None:
    """Shards of an attempt that died may still run or have finished: a retry on a worker
    with another shard_size must split the same way, or the slices would not fit."""
    queue = short_lease(client, settings)
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    first = queue.claim("dies", block_ms=100)
    assert queue.mark_sharded(first, 400, 1437, [1]) == 400
    assert (queue.shards_total(job), queue.shard_num_train(job)) == (4, 1437)
    time.sleep(0.4)
    second = queue.claim("other", block_ms=100)
    assert second is not None and second.attempt == 2
    assert queue.recorded_shard_size(job) == 400
    assert queue.mark_sharded(second, 1000, 1437, [1]) == 400
    assert queue.shards_total(job) == 4


def test_a_canceled_parents_shards_hash_is_deleted(queue: JobQueue) -> None:
    parent, _ = sharded_parent(queue, 2)
    assert queue.shard_done(parent, 0, "a" * 64, base=0.5, share=0.5) == 1
    assert queue.redis.exists(queue.keys.shards_done(parent))
    assert queue.cancel(parent, TENANT).status == JobStatus.CANCELED
    assert not queue.redis.exists(queue.keys.shards_done(parent))
    assert queue.shard_done(parent, 1, "b" * 64, base=0.5, share=0.5) == -1  # nothing recreated
    assert not queue.redis.exists(queue.keys.shards_done(parent))


def test_canceling_a_sharded_parent_stops_its_shards(queue: JobQueue) -> None:
    parent, children = sharded_parent(queue, 2)
    claim = queue.claim("w", block_ms=50)
    assert queue.cancel(parent, TENANT).status == JobStatus.CANCELED  # no worker holds it
    with pytest.raises(JobCanceledError):
        queue.report_progress(claim, 0.1, "scoring")
    queue.finish_canceled(claim)
    assert queue.get(children[0]).status == JobStatus.CANCELED


def test_list_reads_one_page(queue: JobQueue) -> None:
    jobs = [
        queue.submit(JobKind.SELF_INFLUENCE, {**PAYLOAD, "damping": 0.1 * (i + 1)}, tenant=TENANT)
        for i in range(5)
    ]
    newest_first = jobs[::-1]
    assert [r.id for r in queue.list(TENANT, limit=2, offset=1)] == newest_first[1:3]
    assert [r.id for r in queue.list(TENANT, limit=10, offset=4)] == newest_first[4:]
    queue.complete(queue.claim("w", block_ms=50), {})  # the oldest job
    succeeded = queue.list(TENANT, status=JobStatus.SUCCEEDED)
    assert [r.id for r in succeeded] == [jobs[0]]
    assert [r.id for r in queue.list(TENANT, status="queued", limit=2, offset=1)] == [
        newest_first[1],
        newest_first[2],
    ]


def test_shard_jobs_stay_out_of_the_tenant_index(queue: JobQueue) -> None:
    parent, _ = sharded_parent(queue, 2)
    assert queue.redis.zrange(queue.keys.tenant_jobs(TENANT), 0, -1) == [parent]
    assert [r.id for r in queue.list(TENANT)] == [parent]


def test_expired_jobs_leave_the_index_and_the_dead_letter_list_is_bounded(
    client: redis.Redis, settings: Settings
) -> None:
    queue = short_lease(client, settings, result_ttl_seconds=60, dead_letter_max=2)
    index = queue.keys.tenant_jobs(TENANT)
    gone = [queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT) for _ in range(3)]
    client.delete(*(queue.keys.job(j) for j in gone[:2]))  # as if their TTL ran out
    kept = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    assert client.zrange(index, 0, -1) == [gone[2], kept]  # pruned by the submit
    client.delete(queue.keys.job(gone[2]))
    assert [r.id for r in queue.list(TENANT, limit=5)] == [kept]  # pruned by the listing
    assert client.zrange(index, 0, -1) == [kept]

    queue = short_lease(client, settings, dead_letter_max=2, key_prefix=settings.key_prefix + "d:")
    dead = []
    for _ in range(3):
        job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
        dead.append(job)
        for _ in range(3):
            queue.fail(queue.claim("w", block_ms=50), "RuntimeError: boom", retry=True)
    assert [d["job"] for d in queue.dead_letters()] == dead[1:]  # the oldest was dropped
    assert queue.counts()["dead_lettered"] == 3


def test_a_shard_out_of_attempts_at_claim_fails_its_parent(
    client: redis.Redis, settings: Settings
) -> None:
    queue = short_lease(client, settings)
    parent, children = sharded_parent(queue, 2)
    for attempt in (1, 2, 3):  # the shard's workers keep dying
        claim = queue.claim(f"crashing-{attempt}", block_ms=100)
        assert claim is not None and claim.job_id == children[0] and claim.attempt == attempt
        time.sleep(0.4)
    assert queue.claim("survivor", block_ms=0) is None  # gives up on it
    assert queue.get(children[0]).status == JobStatus.FAILED
    record = queue.get(parent)
    assert record.status == JobStatus.FAILED, "the parent waits forever on a dead shard"
    assert children[0] in record.error and "gave up after 3 attempts" in record.error


@pytest.mark.parametrize("end", ["completed", "canceled"])
def test_a_shard_failing_after_its_parent_ended_leaves_the_parent_alone(
    queue: JobQueue, end: str
) -> None:
    parent, children = sharded_parent(queue, 2)
    claim = queue.claim("w", block_ms=50)
    assert claim is not None and claim.job_id == children[0]
    if end == "completed":  # e.g. a retried shard after a concurrent assembly
        assert queue.complete_parent(parent, {"scores": "c" * 64})
    else:
        assert queue.cancel(parent, TENANT).status == JobStatus.CANCELED
    before = queue.get(parent)
    queue.fail(claim, "ValueError: late", retry=False)
    after = queue.get(parent)
    assert (after.status, after.result, after.error) == (before.status, before.result, before.error)
    assert after.status == (JobStatus.SUCCEEDED if end == "completed" else JobStatus.CANCELED)


def test_a_job_that_succeeds_before_its_cancel_is_seen_is_not_canceling(queue: JobQueue) -> None:
    """Cancel lost the race: the job is succeeded, and neither shown as canceling nor
    treated as canceled by the API's in-flight de-duplication (it reads the flag)."""
    job = queue.submit(JobKind.SELF_INFLUENCE, PAYLOAD, tenant=TENANT)
    claim = queue.claim("w", block_ms=50)
    assert queue.cancel(job, TENANT).cancel_requested
    queue.complete(claim, {"answer": 1})
    record = queue.get(job)
    assert record.status == JobStatus.SUCCEEDED and not record.cancel_requested
