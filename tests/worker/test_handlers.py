"""Jobs run end to end by in-process workers (threads) on a real Redis: results equal the
engine's on the same inputs, sharded scoring, caches, failures, cancellation."""

from __future__ import annotations

import time

import pytest
import torch

import models
from influence import CG, Exact, InfluenceEngine
from influence.compiled import CompiledDirectional
from influence.response import VerifyArguments, VerifyResult, verify
from tests.conftest import RTOL_F32
from tests.worker.conftest import (
    MLP_CONFIG,
    TENANT,
    checkpoint_bytes,
    finished,
    influence_payload,
    wait_for,
)
from worker.cache import STestCache, result_key, s_test_key
from worker.contract import JobKind, JobStatus
from worker.handlers import Context, _assemble, _influence, _score_shard
from worker.queue import Claim, JobQueue
from worker.store import ArtifactStore


def engine_for(tiny: dict) -> InfluenceEngine:
    return InfluenceEngine(
        tiny["model"], loss="cross_entropy", train=(tiny["train"].inputs, tiny["train"].targets),
        damping=1e-2,
    )  # fmt: skip


def scores_of(store: ArtifactStore, record) -> torch.Tensor:
    return store.get_tensors(record.result["scores"])["scores"]


def test_influence_job_equals_the_engine_and_is_cached(
    queue: JobQueue, store: ArtifactStore, tiny: dict, thread_worker, settings
) -> None:
    payload = influence_payload(tiny)
    key = result_key(JobKind.INFLUENCE, payload)
    job = queue.submit(JobKind.INFLUENCE, payload, tenant=TENANT, cache_key=key)
    thread_worker()
    record = wait_for(queue, job, finished)
    assert record.status == JobStatus.SUCCEEDED, record.error
    expected = engine_for(tiny).scores(tiny["test"], Exact()).scores
    got = scores_of(store, record)
    assert got.shape == (3, 40)
    torch.testing.assert_close(got, expected, rtol=RTOL_F32, atol=1e-9)
    assert record.result["test_targets"] == tiny["test"][1].tolist()
    assert record.report["method"] == "exact" and record.attempts == 1
    assert "removed" in record.result["meaning"]

    hit = queue.cached_job(TENANT, result_key(JobKind.INFLUENCE, payload))
    assert hit is not None and hit.id == job
    assert queue.counts()["queued"] == 0  # the hit enqueued nothing
    cached = STestCache(queue.redis, settings).get(s_test_key(payload))
    assert cached is not None and cached[0] == record.result["s_test"]
    # both cache entries expire with the cache's lifetime, not never
    for link in (
        queue.keys.result_cache(TENANT, key),
        queue.keys.s_test_cache(s_test_key(payload)),
    ):
        assert 0 < queue.redis.ttl(link) <= settings.cache_ttl_seconds, link


@pytest.mark.parametrize("compile_scoring", [False, True])
def test_sharded_influence_job_assembles_the_same_matrix(
    queue: JobQueue,
    store: ArtifactStore,
    tiny: dict,
    thread_worker,
    compile_scoring: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    statuses: list[str] = []  # of every compiled scoring pass the worker ran
    compiled_pass = CompiledDirectional.__call__

    def spy(self: CompiledDirectional, *args, **kwargs) -> torch.Tensor:
        result = compiled_pass(self, *args, **kwargs)
        statuses.append(self.status)
        return result

    monkeypatch.setattr(CompiledDirectional, "__call__", spy)
    job = queue.submit(JobKind.INFLUENCE, influence_payload(tiny), tenant=TENANT)
    # one thread: torch's forward-AD state is per process
    thread_worker(shard_size=16, compile_scoring=compile_scoring)
    record = wait_for(queue, job, finished)
    assert record.status == JobStatus.SUCCEEDED, record.error
    assert record.attempts == 1 and queue.shards_total(job) == 3
    assert queue.shard_results(job) == {}  # the shards hash goes once assembled
    expected = engine_for(tiny).scores(tiny["test"], Exact()).scores
    # float32 sums over shards of 16 vs one batch of 40: order-of-summation differences
    scale = float(expected.abs().max())
    torch.testing.assert_close(scores_of(store, record), expected, rtol=RTOL_F32, atol=1e-5 * scale)
    assert [r.id for r in queue.list(TENANT)] == [job]  # shard jobs are internal
    events = [e for _, e in queue.events(job)]
    assert [e["progress"] for e in events] == sorted(e["progress"] for e in events)
    assert statuses == (["compiled"] * 3 if compile_scoring else [])  # one per shard


def test_s_test_is_reused_by_a_new_query(
    queue: JobQueue, store: ArtifactStore, tiny: dict, thread_worker, settings
) -> None:
    payload = influence_payload(tiny)
    first = queue.submit(JobKind.INFLUENCE, payload, tenant=TENANT)
    thread_worker()
    one = wait_for(queue, first, finished)
    STestCache(queue.redis, settings).put(s_test_key(payload), one.result["s_test"], {"m": 1})
    second = wait_for(queue, queue.submit(JobKind.INFLUENCE, payload, tenant=TENANT), finished)
    assert second.report == {"m": 1}  # the stored report came back: no new solve
    assert second.result["scores"] == one.result["scores"]


def test_self_influence_job(queue: JobQueue, store: ArtifactStore, tiny: dict, thread_worker):
    payload = {k: v for k, v in influence_payload(tiny).items() if k != "test"}
    job = queue.submit(JobKind.SELF_INFLUENCE, payload, tenant=TENANT)
    thread_worker()
    record = wait_for(queue, job, finished)
    assert record.status == JobStatus.SUCCEEDED, record.error
    engine = engine_for(tiny)
    expected = engine.self_influence(Exact())
    torch.testing.assert_close(scores_of(store, record), expected, rtol=RTOL_F32, atol=1e-9)
    report = engine.last_report.to_dict()  # the aggregated report reaches the job
    assert record.report is not None and set(record.report) == set(report)
    assert record.report["method"] == "exact" and record.report["converged"] is True


@pytest.mark.parametrize(
    ("inputs", "targets", "fragment"),
    [
        (torch.randn(2, 5), torch.tensor([0, 1]), "per-example shape [5]"),
        (torch.randn(2, 4), torch.tensor([0, 7]), "class indices must lie in [0, 3)"),
        (torch.randn(2, 4), torch.tensor([0.0, 1.0]), "must be integers"),
    ],
    ids=["width", "class", "dtype"],
)
def test_bad_test_points_fail_at_once_naming_the_problem(
    queue: JobQueue, store: ArtifactStore, tiny: dict, thread_worker, inputs, targets, fragment
) -> None:
    artifact = store.put_tensors({"inputs": inputs, "targets": targets})
    payload = {**influence_payload(tiny), "test": {"artifact": artifact}}
    job = queue.submit(JobKind.INFLUENCE, payload, tenant=TENANT)
    thread_worker()
    record = wait_for(queue, job, finished)
    assert record.status == JobStatus.FAILED and record.attempts == 1, record.error
    assert fragment in record.error and queue.dead_letters() == []


def test_unknown_model_fails_at_once_naming_it(queue: JobQueue, tiny: dict, thread_worker):
    payload = {**influence_payload(tiny), "model": "f" * 64}
    job = queue.submit(JobKind.INFLUENCE, payload, tenant=TENANT)
    thread_worker()
    record = wait_for(queue, job, finished)
    assert record.status == JobStatus.FAILED and record.attempts == 1
    assert "f" * 64 in record.error and queue.dead_letters() == []


def test_lost_artifact_is_retried_then_dead_lettered_while_others_flow(
    queue: JobQueue, registry, store: ArtifactStore, tiny: dict, thread_worker, tmp_path
) -> None:
    other = models.build(MLP_CONFIG)
    record = registry.put_model(TENANT, MLP_CONFIG, checkpoint_bytes(other, MLP_CONFIG, tmp_path))
    store.delete(record["artifact"])  # e.g. a shared volume that lost the file
    poison = queue.submit(
        JobKind.INFLUENCE, {**influence_payload(tiny), "model": record["id"]}, tenant=TENANT
    )
    good = queue.submit(JobKind.INFLUENCE, influence_payload(tiny), tenant=TENANT)
    thread_worker()
    assert wait_for(queue, good, finished).status == JobStatus.SUCCEEDED
    dead = wait_for(queue, poison, finished)
    assert dead.status == JobStatus.FAILED and dead.attempts == 3
    assert "ArtifactNotFoundError" in dead.error
    assert [d["job"] for d in queue.dead_letters()] == [poison]


@pytest.mark.parametrize("when", ["queued", "running"])
def test_cancel(queue: JobQueue, tiny: dict, thread_worker, when: str) -> None:
    # LiSSA reports progress once per repeat here: a steady cadence of cancel checks
    slow = influence_payload(tiny, name="lissa", depth=400, repeats=30, batch_size=8)
    job = queue.submit(JobKind.INFLUENCE, slow, tenant=TENANT)
    if when == "queued":
        assert queue.cancel(job, TENANT).status == JobStatus.CANCELED
        thread_worker()
    else:
        thread_worker()
        wait_for(queue, job, lambda r: r.status == JobStatus.RUNNING and r.progress > 0)
        assert queue.cancel(job, TENANT).cancel_requested
    record = wait_for(queue, job, finished, timeout=30)
    assert record.status == JobStatus.CANCELED
    assert record.attempts == (0 if when == "queued" else 1)


def test_verify_job_retrains_the_top_points(
    queue: JobQueue, store: ArtifactStore, tiny: dict, thread_worker
) -> None:
    source = queue.submit(JobKind.INFLUENCE, influence_payload(tiny), tenant=TENANT)
    thread_worker()
    assert wait_for(queue, source, finished).status == JobStatus.SUCCEEDED
    check = {"job": source, "top": 2, "method": "linearized", "test": 0, "steps": 20}
    record = wait_for(queue, queue.submit(JobKind.VERIFY, check, tenant=TENANT), finished)
    assert record.status == JobStatus.SUCCEEDED, record.error
    result = record.result
    assert result["method"] == "linearized" and 2 <= len(result["train_indices"]) <= 4
    scores = store.get_tensors(queue.get(source).result["scores"])["scores"][0]
    order = scores.argsort(descending=True).tolist()
    assert result["train_indices"] == sorted(set(order[:2] + order[-2:]))
    test = models.Dataset(tiny["test"][0][:1], tiny["test"][1][:1])
    direct = verify(
        (tiny["model"], MLP_CONFIG), tiny["train"], test, result["train_indices"],
        damping=1e-2, method="linearized", arguments=VerifyArguments(steps=20, solver="exact"),
    )  # fmt: skip
    torch.testing.assert_close(
        torch.tensor(result["predicted"], dtype=torch.float64), direct.predicted
    )
    torch.testing.assert_close(torch.tensor(result["actual"], dtype=torch.float64), direct.actual)


def test_verify_of_a_missing_job_fails_naming_it(queue: JobQueue, thread_worker) -> None:
    job = queue.submit(JobKind.VERIFY, {"job": "nope"}, tenant=TENANT)
    thread_worker()
    record = wait_for(queue, job, finished)
    assert record.status == JobStatus.FAILED and "nope" in record.error


def test_decomposition_job_on_a_checkpoint(queue: JobQueue, tiny: dict, thread_worker) -> None:
    payload = {
        "model": tiny["model_id"],
        "train": tiny["train_id"],
        "recipe": {"optimizer": "sgd", "lr": 0.1, "epochs": 2, "batch_size": 10},
        "damping": 1e-2,
        "response": {"optimizer": "lbfgs", "lbfgs_steps": 5},
        "arguments": {"num_points": 2, "seed": 0},
    }
    thread_worker()
    record = wait_for(queue, queue.submit(JobKind.DECOMPOSITION, payload, tenant=TENANT), finished)
    assert record.status == JobStatus.SUCCEEDED, record.error
    summary = record.result["summary"]
    assert "warm_start" not in summary  # a checkpoint has no recorded θ⁰
    assert {"proximity", "non_convergence", "linearization", "solver"} <= set(summary)
    assert all(len(v) == 2 for v in record.result["gaps"].values())


def test_verify_job_checks_with_the_querys_curvature_and_solver(
    queue: JobQueue, store: ArtifactStore, tiny: dict, thread_worker, monkeypatch
) -> None:
    solver = {"name": "cg", "tol": 1e-9, "max_iter": 77}
    query = {**influence_payload(tiny), "hessian": "full", "solver": solver}
    source = queue.submit(JobKind.INFLUENCE, query, tenant=TENANT)
    claim = queue.claim("manual", block_ms=100)  # a finished query without running it
    scores = store.put_tensors({"scores": torch.arange(120.0).reshape(3, 40)})
    queue.complete(claim, {"scores": scores, "num_test": 3})
    seen: dict = {}

    def fake_verify(*args, **kwargs):
        seen.update(kwargs, train_indices=args[3])
        return VerifyResult("pbrf", args[3], torch.zeros(4, 1), torch.zeros(4, 1), {"m": 1})

    monkeypatch.setattr("worker.handlers.verify", fake_verify)
    check = {"job": source, "top": 2, "test": 1, "steps": 7}
    thread_worker()
    record = wait_for(queue, queue.submit(JobKind.VERIFY, check, tenant=TENANT), finished)
    assert record.status == JobStatus.SUCCEEDED, record.error
    assert seen["hessian"] == "full" and seen["damping"] == 1e-2
    assert seen["solver"] == CG(tol=1e-9, max_iter=77)
    assert seen["arguments"] == VerifyArguments(steps=7, solver="cg")
    assert seen["train_indices"] == [0, 1, 38, 39] and record.report == {"m": 1}


def _decomposition_payload(tiny: dict, train_id: str, **extra) -> dict:
    return {
        "model": tiny["model_id"],
        "train": train_id,
        "recipe": {"optimizer": "sgd", "lr": 0.1, "epochs": 2, "batch_size": 10},
        "damping": 1e-2,
        "response": {"optimizer": "lbfgs", "lbfgs_steps": 5},
        "arguments": {"num_points": 2, "seed": 0},
        **extra,
    }


def test_decomposition_job_with_mislabel_curves(queue: JobQueue, tiny: dict, thread_worker) -> None:
    mislabel = {"fraction": 0.1, "seed": 0, "solver": "exact"}
    payload = _decomposition_payload(tiny, tiny["train_id"], mislabel=mislabel)
    thread_worker()
    job = queue.submit(JobKind.DECOMPOSITION, payload, tenant=TENANT)
    record = wait_for(queue, job, finished)
    assert record.status == JobStatus.SUCCEEDED, record.error
    assert "summary" in record.result  # the decomposition is still there
    found = record.result["mislabel"]
    assert found["num_train"] == 40 and len(found["corrupted"]) == 4
    curves = found["curves"]
    assert {"inspected", "self-influence", "training loss", "random"} <= set(curves)
    assert len(curves["random"]) == len(curves["inspected"]) == 101
    for name in ("self-influence", "training loss", "random"):
        assert curves[name][0] == 0.0 and curves[name][-1] == 1.0
        assert curves[name] == sorted(curves[name])
    events = [e for _, e in queue.events(job)]
    assert [e["progress"] for e in events] == sorted(e["progress"] for e in events)


def test_decomposition_mislabel_on_a_regression_set_fails(
    queue: JobQueue, registry, tiny: dict, thread_worker, tmp_path
) -> None:
    from tests.worker.conftest import dataset_bytes

    gen = torch.Generator().manual_seed(1)
    data = models.Dataset(
        torch.randn(20, 4, generator=gen), torch.randn(20, 3, generator=gen), {"task": "regression"}
    )
    regression = registry.put_dataset(TENANT, dataset_bytes(data, tmp_path))["id"]
    payload = _decomposition_payload(tiny, regression, mislabel={"fraction": 0.1})
    thread_worker()
    record = wait_for(queue, queue.submit(JobKind.DECOMPOSITION, payload, tenant=TENANT), finished)
    assert record.status == JobStatus.FAILED and record.attempts == 1
    assert "mislabel" in record.error and "classification" in record.error


@pytest.mark.parametrize(
    ("config", "loss", "fragment"),
    [
        (
            {**MLP_CONFIG, "in_features": 5},
            "cross_entropy",
            "the model cannot take the training inputs",
        ),
        ({**MLP_CONFIG, "out_features": 2}, "cross_entropy", "class indices [0, 2) (the model"),
        (MLP_CONFIG, "mse", "the mse loss cannot take the model's outputs (per-example shape [3])"),
    ],
    ids=["input-width", "classes", "loss"],
)
def test_model_that_does_not_fit_its_data_fails_at_once_naming_both(
    queue: JobQueue, registry, tiny: dict, thread_worker, tmp_path, config, loss, fragment
) -> None:
    model = models.build(config)
    model_id = registry.put_model(TENANT, config, checkpoint_bytes(model, config, tmp_path))["id"]
    payload = {**influence_payload(tiny), "model": model_id, "loss": loss}
    job = queue.submit(JobKind.INFLUENCE, payload, tenant=TENANT)
    thread_worker()
    record = wait_for(queue, job, finished)
    assert record.status == JobStatus.FAILED and record.attempts == 1, record.error
    assert fragment in record.error and "ValueError" in record.error
    assert model_id in record.error and tiny["train_id"] in record.error
    assert f"loss {loss!r}" in record.error and queue.dead_letters() == []


def test_decomposition_checks_its_test_points_before_retraining(
    queue: JobQueue, store: ArtifactStore, tiny: dict, thread_worker, monkeypatch
) -> None:
    calls = []
    monkeypatch.setattr("worker.handlers.decompose", lambda *a, **k: calls.append(a))
    artifact = store.put_tensors({"inputs": torch.randn(2, 5), "targets": torch.tensor([0, 1])})
    payload = _decomposition_payload(
        tiny, tiny["train_id"], test={"artifact": artifact}, correlation={}
    )
    thread_worker()
    record = wait_for(queue, queue.submit(JobKind.DECOMPOSITION, payload, tenant=TENANT), finished)
    assert record.status == JobStatus.FAILED and record.attempts == 1, record.error
    assert "per-example shape [5]" in record.error and calls == []


def test_sharded_job_assembles_after_its_test_set_was_deleted(
    queue: JobQueue, registry, tiny: dict, thread_worker, tmp_path, monkeypatch
) -> None:
    from tests.worker.conftest import dataset_bytes

    inputs, targets = tiny["test"]
    test_id = registry.put_dataset(
        TENANT, dataset_bytes(models.Dataset(inputs, targets), tmp_path)
    )["id"]
    hand_over = JobQueue.hand_over_to_shards

    def delete_then_hand_over(self, claim, report):
        registry.delete_dataset(TENANT, test_id)  # the user deletes it while shards run
        hand_over(self, claim, report)

    monkeypatch.setattr(JobQueue, "hand_over_to_shards", delete_then_hand_over)
    payload = {**influence_payload(tiny), "test": {"dataset": test_id, "indices": [2, 0]}}
    job = queue.submit(JobKind.INFLUENCE, payload, tenant=TENANT)
    thread_worker(shard_size=16)
    record = wait_for(queue, job, finished)
    assert record.status == JobStatus.SUCCEEDED, record.error
    assert queue.shards_total(job) == 3 and registry.get_dataset(TENANT, test_id) is None
    assert record.result["test_targets"] == [targets[2].item(), targets[0].item()]
    assert record.result["num_test"] == 2 and record.result["num_train"] == 40
    assert not queue.redis.exists(queue.keys.shards_done(job))


def test_warm_engines_are_kept_apart_by_weight_decay_and_hessian(
    queue: JobQueue, store: ArtifactStore, tiny: dict, thread_worker
) -> None:
    """One worker (one warm Context) runs queries that differ only in weight decay, then
    only in curvature: each must be scored by an engine of its own settings."""
    base = {**influence_payload(tiny), "damping": 0.5}  # the full Hessian is indefinite here
    variants = [
        {"weight_decay": 0.0, "hessian": "gnh"},
        {"weight_decay": 0.5, "hessian": "gnh"},
        {"weight_decay": 0.0, "hessian": "full"},
    ]
    thread_worker()
    got = []
    for variant in variants:
        job = queue.submit(JobKind.INFLUENCE, {**base, **variant}, tenant=TENANT)
        record = wait_for(queue, job, finished)
        assert record.status == JobStatus.SUCCEEDED, record.error
        got.append(scores_of(store, record))
    train = (tiny["train"].inputs, tiny["train"].targets)
    for variant, scores in zip(variants, got, strict=True):
        fresh = InfluenceEngine(tiny["model"], loss="cross_entropy", train=train, damping=0.5,
                                **variant)  # fmt: skip
        expected = fresh.scores(tiny["test"], Exact()).scores
        torch.testing.assert_close(scores, expected, rtol=RTOL_F32, atol=1e-9, msg=str(variant))
    for other in got[1:]:  # the settings matter on this model: a shared engine would show
        assert not torch.allclose(got[0], other, rtol=1e-3, atol=1e-6)


def _handed_over_parent(
    queue: JobQueue, tiny: dict, size: int, num_train: int
) -> tuple[str, Claim]:
    """An influence job split into shards of ``size`` of its ``num_train`` points (as
    ``_influence`` does), its own shard jobs not yet submitted."""
    parent = queue.submit(JobKind.INFLUENCE, influence_payload(tiny), tenant=TENANT)
    claim = queue.claim("w", block_ms=100)
    assert claim is not None and claim.job_id == parent
    assert queue.mark_sharded(claim, size, num_train, tiny["test"][1].tolist()) == size
    return parent, claim


def test_assemble_waits_for_every_shard_and_orders_them_by_index(
    queue: JobQueue, registry, store: ArtifactStore, tiny: dict, settings
) -> None:
    ctx = Context(queue, registry, settings, "cpu")
    parent, claim = _handed_over_parent(queue, tiny, 3, 9)  # 3 shards, 9 scores in all
    queue.hand_over_to_shards(claim, {"method": "exact"})
    s_test = store.put_tensors({"s_test": torch.zeros(3, 5)})
    parts = [torch.full((3, width), float(i)) for i, width in enumerate((2, 3, 4))]
    for i in (2, 0):  # shards finish out of order
        artifact = store.put_tensors({"scores": parts[i]})
        queue.shard_done(parent, i, artifact, base=0.5, share=0.5)
    _assemble(ctx, parent, s_test, 3)  # 2 of 3 done: nothing to assemble yet
    record = queue.get(parent)
    assert record.status == JobStatus.RUNNING and record.result is None
    queue.shard_done(parent, 1, store.put_tensors({"scores": parts[1]}), base=0.5, share=0.5)
    _assemble(ctx, parent, s_test, 3)
    record = queue.get(parent)
    assert record.status == JobStatus.SUCCEEDED, record.error
    assert torch.equal(scores_of(store, record), torch.cat(parts, dim=1))
    assert record.result["num_train"] == 9 and record.result["s_test"] == s_test
    assert record.result["test_targets"] == tiny["test"][1].tolist()


def test_only_the_shard_that_completes_the_set_assembles(
    queue: JobQueue, registry, store: ArtifactStore, tiny: dict, settings, monkeypatch
) -> None:
    """Shards scored out of order (2, 0, 1) by the handler: the first two leave the parent
    running without trying to assemble; the last one assembles the engine's matrix."""
    assembled: list[int] = []
    real_assemble = _assemble

    def spy(ctx, parent_id, s_test, total):
        assembled.append(len(ctx.queue.shard_results(parent_id)))
        real_assemble(ctx, parent_id, s_test, total)

    monkeypatch.setattr("worker.handlers._assemble", spy)
    ctx = Context(queue, registry, settings, "cpu")
    engine = engine_for(tiny)
    s_test, _ = engine.s_test(tiny["test"], Exact())
    s_artifact = store.put_tensors({"s_test": s_test})
    parent, claim = _handed_over_parent(queue, tiny, 16, 40)
    body = {k: v for k, v in influence_payload(tiny).items() if k != "test"}
    for index, (lo, hi) in enumerate([(0, 16), (16, 32), (32, 40)]):
        shard = {**body, "parent": parent, "index": index, "start": lo, "stop": hi,
                 "s_test": s_artifact}  # fmt: skip
        queue.submit(JobKind.SCORE_SHARD, shard, tenant=TENANT, parent=parent)
    queue.hand_over_to_shards(claim, {"method": "exact"})
    claims = {}
    for _ in range(3):
        shard_claim = queue.claim("w", block_ms=100)
        claims[shard_claim.job.payload["index"]] = shard_claim
    for step, index in enumerate((2, 0, 1)):
        shard_claim = claims[index]
        _score_shard(ctx, shard_claim, queue.progress_callback(shard_claim))
        if step < 2:
            record = queue.get(parent)
            assert record.status == JobStatus.RUNNING and record.result is None
            assert assembled == [], "assembly tried before every shard was done"
    assert assembled == [3]
    record = queue.get(parent)
    assert record.status == JobStatus.SUCCEEDED, record.error
    expected = engine.scores(tiny["test"], Exact()).scores
    scale = float(expected.abs().max())
    torch.testing.assert_close(scores_of(store, record), expected, rtol=RTOL_F32, atol=1e-5 * scale)


def test_lost_s_test_artifact_is_solved_again(
    queue: JobQueue, store: ArtifactStore, tiny: dict, thread_worker, settings
) -> None:
    """The s_test cache names an artifact that the store lost: the next query with the same
    s_test key solves it again instead of failing on the missing file."""
    payload = influence_payload(tiny)
    thread_worker()
    first = wait_for(queue, queue.submit(JobKind.INFLUENCE, payload, tenant=TENANT), finished)
    assert first.status == JobStatus.SUCCEEDED, first.error
    cached = STestCache(queue.redis, settings).get(s_test_key(payload))
    assert cached is not None and store.delete(cached[0])
    second = wait_for(queue, queue.submit(JobKind.INFLUENCE, payload, tenant=TENANT), finished)
    assert second.status == JobStatus.SUCCEEDED and second.attempts == 1, second.error
    expected = engine_for(tiny).scores(tiny["test"], Exact()).scores
    torch.testing.assert_close(scores_of(store, second), expected, rtol=RTOL_F32, atol=1e-9)
    assert store.exists(second.result["s_test"])


def test_a_retried_sharded_job_keeps_its_first_split_on_a_worker_with_another_shard_size(
    client, settings, registry, store: ArtifactStore, tiny: dict
) -> None:
    """The first attempt split 40 points into shards of 16, scored shard 0 and died before
    its hand-over. The retry runs on a worker whose shard_size is 1000: it keeps the split,
    submits only the two shards not yet scored, and the result holds all 40 scores."""
    short = settings.model_copy(update={"lease_seconds": 0.3, "heartbeat_seconds": 0.1})
    queue = JobQueue(client, short)
    job = queue.submit(JobKind.INFLUENCE, influence_payload(tiny), tenant=TENANT)
    first = queue.claim("dies", block_ms=100)
    queue.mark_sharded(first, 16, 40, tiny["test"][1].tolist())
    expected = engine_for(tiny).scores(tiny["test"], Exact()).scores
    queue.shard_done(job, 0, store.put_tensors({"scores": expected[:, :16]}), base=0.5, share=0.5)
    time.sleep(0.4)  # its lease runs out
    second = queue.claim("retry", block_ms=100)
    assert second is not None and second.job_id == job and second.attempt == 2
    wide = Context(queue, registry, short.model_copy(update={"shard_size": 1000}), "cpu")
    assert _influence(wide, second, queue.progress_callback(second)) is None  # handed over
    shards = [queue.claim("w", block_ms=100) for _ in range(2)]
    assert sorted(c.job.payload["index"] for c in shards) == [1, 2]
    assert queue.claim("w", block_ms=0) is None  # shard 0 was not submitted again
    for claim in shards:
        _score_shard(wide, claim, queue.progress_callback(claim))
    record = queue.get(job)
    assert record.status == JobStatus.SUCCEEDED, record.error
    assert record.result["num_train"] == 40
    scale = float(expected.abs().max())
    torch.testing.assert_close(scores_of(store, record), expected, rtol=RTOL_F32, atol=1e-5 * scale)


def test_shards_that_do_not_cover_the_training_set_fail_the_parent(
    queue: JobQueue, registry, store: ArtifactStore, tiny: dict, settings
) -> None:
    ctx = Context(queue, registry, settings, "cpu")
    parent, claim = _handed_over_parent(queue, tiny, 3, 10)  # 10 points recorded
    queue.hand_over_to_shards(claim, {"method": "exact"})
    for i, width in enumerate((2, 3, 4)):  # 9 scores: slices of another split
        artifact = store.put_tensors({"scores": torch.zeros(3, width)})
        queue.shard_done(parent, i, artifact, base=0.5, share=0.5)
    _assemble(ctx, parent, store.put_tensors({"s_test": torch.zeros(3, 5)}), 3)
    record = queue.get(parent)
    assert record.status == JobStatus.FAILED and record.result is None
    assert "9 scores for 10 training points" in record.error
