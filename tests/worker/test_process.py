"""Worker processes (``python -m worker``) on a real Redis: a SIGKILLed worker's job is
finished by another one, exactly once; SIGTERM stops a worker cleanly."""

from __future__ import annotations

import signal

import torch

from influence import InfluenceEngine, LiSSA
from tests.worker.conftest import TENANT, finished, influence_payload, wait_for
from worker.contract import GROUP, JobKind, JobStatus
from worker.queue import JobQueue
from worker.store import ArtifactStore

LISSA = {"name": "lissa", "depth": 400, "repeats": 3, "batch_size": 8, "seed": 0}


def test_sigkilled_worker_job_completes_on_another_exactly_once(
    queue: JobQueue, store: ArtifactStore, tiny: dict, process_worker
) -> None:
    job = queue.submit(JobKind.INFLUENCE, influence_payload(tiny, **LISSA), tenant=TENANT)
    workers = {name: process_worker(name) for name in ("worker-a", "worker-b")}
    mid = wait_for(queue, job, lambda r: r.status == JobStatus.RUNNING and r.progress > 0)
    assert mid.attempts == 1 and mid.progress < 1
    victim = workers.pop(mid.worker)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)

    record = wait_for(queue, job, finished, timeout=120)
    (survivor_name, survivor) = workers.popitem()
    assert record.status == JobStatus.SUCCEEDED, record.error
    assert record.attempts == 2 and record.worker == survivor_name
    statuses = [event["status"] for _, event in queue.events(job)]
    assert statuses.count("succeeded") == 1 and statuses[-1] == "succeeded"
    assert queue.counts()["succeeded"] == 1
    assert queue.redis.xpending(queue.keys.stream, GROUP)["pending"] == 0

    train = (tiny["train"].inputs, tiny["train"].targets)
    engine = InfluenceEngine(tiny["model"], train=train, damping=1e-2)
    solver = LiSSA(depth=400, repeats=3, batch_size=8, seed=0)
    expected = engine.scores(tiny["test"], solver).scores
    got = store.get_tensors(record.result["scores"])["scores"]
    # LiSSA is seeded and the computation deterministic: the finishing attempt (whatever it
    # reuses from the killed one) must give the very scores of one uninterrupted solve
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    survivor.send_signal(signal.SIGTERM)
    assert survivor.wait(timeout=20) == 0
