"""One handler per job kind. Models, datasets and engines stay loaded between jobs (a small
LRU keyed by content ids), so a worker pays a load once, not once per job.

A handler returns ``Outcome(result, report)`` for the queue to store, or None when it has
handed the job over (an influence job split into score_shard jobs). Progress goes through
the claim's callback, which raises to abort (cancel, stale attempt, time limit).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import models
from influence import InfluenceEngine
from influence.decomposition import DecompositionArguments, decompose
from influence.experiments.config import (
    CorrelationArguments,
    MislabelArguments,
    build_dataclass,
)
from influence.experiments.correlation import correlate
from influence.experiments.mislabel import detect_mislabels_on
from influence.response import Responder, ResponseArguments, VerifyArguments, verify
from influence.solvers import phase_progress
from models import Progress
from models.datasets import first_outside
from worker.cache import STestCache, s_test_key
from worker.contract import (
    DecompositionPayload,
    InfluencePayload,
    InfluenceResult,
    JobKind,
    JobStatus,
    ScoreShardPayload,
    SelfInfluencePayload,
    SelfInfluenceResult,
    TestSpec,
    VerifyPayload,
    check_mislabel_training_set,
)
from worker.queue import Claim, JobQueue
from worker.settings import Settings
from worker.store import Registry

__all__ = ["S_TEST_SHARE", "Context", "Outcome", "run_job"]

S_TEST_SHARE = 0.5
"""Share of an influence job's progress given to the s_test solve (the rest: scoring)."""

_EngineSpec = InfluencePayload | SelfInfluencePayload | ScoreShardPayload


@dataclass(frozen=True)
class Outcome:
    """What a finished handler hands the queue: the result JSON and the solver report."""

    result: dict[str, Any]
    report: dict[str, Any] | None = None


class _LRU:
    """A tiny least-recently-used map."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        """The value for ``key``, made by ``make()`` (and kept) on a miss."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return value


class Context:
    """What a worker keeps between jobs: queue, registry, store, and warm LRU caches."""

    def __init__(
        self, queue: JobQueue, registry: Registry, settings: Settings, device: str
    ) -> None:
        self.queue = queue
        self.registry = registry
        self.store = registry.store
        self.s_tests = STestCache(queue.redis, settings)
        self.settings = settings
        self.device = device
        self._models = _LRU(settings.model_cache_size)
        self._datasets = _LRU(settings.model_cache_size)
        self._engines = _LRU(settings.model_cache_size)

    def release_memory(self) -> None:
        """Drop the warm engines (each holds its training set and any dense curvature on
        the device) and return the cached device memory, so the retry of a job that ran out
        of memory does not meet the same full device."""
        self._engines = _LRU(self.settings.model_cache_size)
        if self.device != "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def checkpoint(self, tenant: str, model_id: str) -> tuple[nn.Module, dict[str, Any]]:
        """The tenant's model and its config (access checked every call; loaded once per
        content id)."""
        if self.registry.get_model(tenant, model_id) is None:
            raise KeyError(f"model {model_id} not found")
        return self._models.get(model_id, lambda: self.registry.load_model(tenant, model_id))

    def dataset(self, tenant: str, dataset_id: str) -> models.Dataset:
        """The tenant's dataset (access checked every call; loaded once per content id)."""
        if self.registry.get_dataset(tenant, dataset_id) is None:
            raise KeyError(f"dataset {dataset_id} not found")
        return self._datasets.get(
            dataset_id, lambda: self.registry.load_dataset(tenant, dataset_id)
        )

    def engine(self, tenant: str, spec: _EngineSpec) -> InfluenceEngine:
        """The engine for (model, train, loss, hessian, damping, weight decay). A model,
        training set and loss that do not fit together fail its construction checks with a
        ValueError, here prefixed with their ids: the job fails at once (no retry), instead
        of meeting a torch error deep in a solve attempt after attempt."""
        model, _ = self.checkpoint(tenant, spec.model)
        train = self.dataset(tenant, spec.train)
        key = (spec.model, spec.train, spec.loss, spec.hessian, spec.damping, spec.weight_decay)

        def build() -> InfluenceEngine:
            try:
                return InfluenceEngine(
                    model,
                    loss=spec.loss,
                    train=(train.inputs, train.targets),
                    hessian=spec.hessian,
                    damping=spec.damping,
                    weight_decay=spec.weight_decay,
                    device=self.device,
                    compile_scoring=self.settings.compile_scoring,
                )
            except ValueError as exc:
                raise ValueError(
                    f"model {spec.model}, training set {spec.train} and loss {spec.loss!r} "
                    f"do not fit together: {exc}"
                ) from exc

        return self._engines.get(key, build)

    def test_points(
        self,
        tenant: str,
        test: TestSpec,
        spec: _EngineSpec | DecompositionPayload | None = None,
    ) -> models.Dataset:
        """The test points a TestSpec names, as a Dataset (metadata of the source dataset,
        or none for an uploaded tensor pair). With ``spec`` they are checked against its
        model and training set (``check_test_points``), so bad points fail the job at once
        (ValueError) instead of deep in the engine, attempt after attempt."""
        if test.artifact is not None:
            tensors = self.store.get_tensors(test.artifact)
            missing = sorted({"inputs", "targets"} - set(tensors))
            if missing:
                raise ValueError(f"test artifact {test.artifact} lacks tensor(s) {missing}")
            points = models.Dataset(tensors["inputs"], tensors["targets"])
        else:
            dataset = self.dataset(tenant, str(test.dataset))
            indices = list(test.indices or [])
            bad = [i for i in indices if i >= len(dataset)]
            if bad:
                raise ValueError(
                    f"test.indices {bad[:5]} out of range for dataset {test.dataset} of "
                    f"{len(dataset)} examples"
                )
            points = dataset.subset(indices)
        if spec is not None:
            _, config = self.checkpoint(tenant, spec.model)
            check_test_points(points, self.dataset(tenant, spec.train), config)
        return points


def check_test_points(test: models.Dataset, train: models.Dataset, config: dict[str, Any]) -> None:
    """ValueError naming the problem unless ``test`` fits the model and its training set:
    same per-example shapes and kinds (real or integer), integer token ids in
    ``[0, vocab_size)`` where the inputs are tokens, class indices in ``[0, num_classes)``
    (or the vocabulary) where the targets are classes."""
    for name, got, want in (
        ("inputs", test.inputs, train.inputs),
        ("targets", test.targets, train.targets),
    ):
        if got.shape[1:] != want.shape[1:]:
            raise ValueError(
                f"test {name} have per-example shape {list(got.shape[1:])}; the training "
                f"{name} have {list(want.shape[1:])}"
            )
        if got.is_floating_point() != want.is_floating_point():
            kind = "real values" if want.is_floating_point() else "integers"
            raise ValueError(f"test {name} must be {kind} like the training {name}")
    vocab = config.get("vocab_size")
    if not train.inputs.is_floating_point():
        _check_indices(test.inputs, vocab, "inputs", "token ids")
    if not train.targets.is_floating_point():
        classes = train.metadata.get("num_classes") or vocab
        _check_indices(test.targets, classes, "targets", "class indices")


def _check_indices(values: Tensor, bound: int | None, name: str, what: str) -> None:
    found = first_outside(values, 0, math.inf if bound is None else bound)
    if found is not None:
        limit = "∞" if bound is None else str(bound)
        raise ValueError(f"test {name} of point {found[0]}: {what} must lie in [0, {limit})")


def _s_test(
    ctx: Context,
    tenant: str,
    payload: InfluencePayload,
    test: models.Dataset,
    progress: Progress | None,
) -> tuple[str, Tensor, dict[str, Any]]:
    """``s_test = (G + λI)⁻¹ ∇L_q`` for each test point (Eqn 50), from the cache or solved
    and stored. Returns (artifact id, s_test [k, d], solver report)."""
    key = s_test_key(payload)
    cached = ctx.s_tests.get(key)
    if cached is not None and ctx.store.exists(cached[0]):
        artifact, report = cached
        return artifact, ctx.store.get_tensors(artifact)["s_test"], report
    engine = ctx.engine(tenant, payload)
    s_test, report = engine.s_test((test.inputs, test.targets), payload.solver.build(), progress)
    artifact = ctx.store.put_tensors({"s_test": s_test})
    ctx.s_tests.put(key, artifact, report.to_dict())
    return artifact, s_test, report.to_dict()


def _influence_result(
    ctx: Context, scores: Tensor, s_test: str, test_targets: list[Any]
) -> dict[str, Any]:
    """The result JSON of an influence job: its ``[k, N]`` score matrix stored as an
    artifact, the s_test artifact and the test points' targets."""
    return InfluenceResult(
        scores=ctx.store.put_tensors({"scores": scores}),
        s_test=s_test,
        num_test=int(scores.shape[0]),
        num_train=int(scores.shape[1]),
        test_targets=test_targets,
    ).model_dump(mode="json")


def _influence(ctx: Context, claim: Claim, progress: Progress) -> Outcome | None:
    """Solve s_test (or reuse it), then score every training point: in this job, or for a
    training set over ``shard_size`` in score_shard jobs that any worker can take."""
    tenant = claim.job.tenant
    payload = InfluencePayload.model_validate(claim.job.payload)
    progress(0.0, "s_test")
    test = ctx.test_points(tenant, payload.test, payload)  # loaded once, checked
    s_artifact, s_test, report = _s_test(
        ctx, tenant, payload, test, phase_progress(progress, 0.0, S_TEST_SHARE)
    )
    progress(S_TEST_SHARE, "scoring")
    n = len(ctx.dataset(tenant, payload.train))
    # an earlier attempt's split stands (its shards may still run), whatever this worker's
    # shard_size: shards of both attempts then record the same slices
    shard = ctx.queue.recorded_shard_size(claim.job_id)
    if shard is not None or n > ctx.settings.shard_size:
        shard = ctx.queue.mark_sharded(
            claim, shard or ctx.settings.shard_size, n, test.targets.tolist()
        )
        finished = ctx.queue.shard_results(claim.job_id)
        for index, lo in enumerate(range(0, n, shard)):
            if index in finished:  # scored by an earlier attempt's shard
                continue
            body = payload.model_dump(mode="json", exclude={"test"})
            body.update(
                parent=claim.job_id, index=index, start=lo, stop=min(n, lo + shard),
                s_test=s_artifact,
            )  # fmt: skip
            ctx.queue.submit(JobKind.SCORE_SHARD, body, tenant=tenant, parent=claim.job_id)
        ctx.queue.hand_over_to_shards(claim, report)
        return None
    engine = ctx.engine(tenant, payload)
    scores = engine.scores_from_s_test(s_test, progress=phase_progress(progress, S_TEST_SHARE, 1.0))
    return Outcome(_influence_result(ctx, scores, s_artifact, test.targets.tolist()), report)


def _score_shard(ctx: Context, claim: Claim, progress: Progress) -> Outcome:
    """Score one slice; the shard that completes the set assembles the parent's result
    (idempotent: a retried last shard assembles the same artifact again)."""
    tenant = claim.job.tenant
    payload = ScoreShardPayload.model_validate(claim.job.payload)
    progress(0.0, "scoring")  # raises at once if the parent was canceled meanwhile
    engine = ctx.engine(tenant, payload)
    s_test = ctx.store.get_tensors(payload.s_test)["s_test"]
    scores = engine.scores_from_s_test(s_test, payload.start, payload.stop, progress=progress)
    artifact = ctx.store.put_tensors({"scores": scores})
    done = ctx.queue.shard_done(
        payload.parent, payload.index, artifact, base=S_TEST_SHARE, share=1 - S_TEST_SHARE
    )
    total = ctx.queue.shards_total(payload.parent)
    if done == total:
        _assemble(ctx, payload.parent, payload.s_test, total)
    return Outcome({"scores": artifact, "start": payload.start, "stop": payload.stop})


def _assemble(ctx: Context, parent_id: str, s_test: str, total: int) -> None:
    """Concatenate the shards' score slices into the parent's result and complete it,
    with the test targets recorded at hand-over (the test set is not reloaded: it may
    have been deleted meanwhile). Nothing to do when the parent finished meanwhile (a
    concurrent assembly, a cancel): its shards hash is gone then."""
    parent = ctx.queue.get(parent_id)
    if parent is None or parent.status != JobStatus.RUNNING:
        return
    shards = ctx.queue.shard_results(parent_id)
    if len(shards) != total:
        return
    parts = [ctx.store.get_tensors(shards[i])["scores"] for i in sorted(shards)]
    scores = torch.cat(parts, dim=1)
    expected = ctx.queue.shard_num_train(parent_id)
    if expected is not None and scores.shape[1] != expected:  # never with one recorded split
        ctx.queue.fail_parent(
            parent_id, f"its shards hold {scores.shape[1]} scores for {expected} training points"
        )
        return
    test_targets = ctx.queue.shard_test_targets(parent_id)
    if test_targets is None:  # handed over by a worker that did not record them
        payload = InfluencePayload.model_validate(parent.payload)
        test_targets = ctx.test_points(parent.tenant, payload.test).targets.tolist()
    ctx.queue.complete_parent(parent_id, _influence_result(ctx, scores, s_test, test_targets))


def _self_influence(ctx: Context, claim: Claim, progress: Progress) -> Outcome:
    """``(1/N) ∇L_iᵀ (G+λI)⁻¹ ∇L_i`` for every training point, with the engine's report
    aggregated over its solves (largest residual, converged only if all did)."""
    payload = SelfInfluencePayload.model_validate(claim.job.payload)
    engine = ctx.engine(claim.job.tenant, payload)
    scores = engine.self_influence(payload.solver.build(), progress=progress)
    report = engine.last_report
    result = SelfInfluenceResult(
        scores=ctx.store.put_tensors({"scores": scores}), num_train=int(scores.shape[0])
    )
    return Outcome(result.model_dump(mode="json"), report.to_dict() if report else None)


def _verify(ctx: Context, claim: Claim, progress: Progress) -> Outcome:
    """Retrain-based check (influence.response.verify) of the top-k helpful and harmful
    training points of a finished influence job."""
    tenant = claim.job.tenant
    payload = VerifyPayload.model_validate(claim.job.payload)
    source = ctx.queue.get(payload.job, tenant)
    if source is None or source.kind != JobKind.INFLUENCE or source.result is None:
        raise ValueError(f"job: {payload.job} is not a succeeded influence job of this tenant")
    query = InfluencePayload.model_validate(source.payload)
    scores = ctx.store.get_tensors(source.result["scores"])["scores"]
    rows = [payload.test] if payload.test is not None else list(range(scores.shape[0]))
    if rows[-1] >= scores.shape[0]:
        raise ValueError(f"test: row {rows[-1]} out of range for {scores.shape[0]} test points")
    top = min(payload.top, scores.shape[1])
    chosen: set[int] = set()
    for row in rows:
        order = torch.argsort(scores[row], descending=True)
        chosen.update(order[:top].tolist() + order[-top:].tolist())
    # the same curvature and solver settings as the query being checked
    outcome = verify(
        ctx.checkpoint(tenant, query.model),
        ctx.dataset(tenant, query.train),
        ctx.test_points(tenant, query.test, query).subset(rows),
        sorted(chosen),
        loss=query.loss,
        damping=query.damping,
        weight_decay=query.weight_decay,
        hessian=query.hessian,
        method=payload.method,
        arguments=VerifyArguments(steps=payload.steps, solver=query.solver.name),
        solver=query.solver.build(),
        progress=progress,
        device=str(ctx.device),
    )
    result = outcome.to_dict()
    return Outcome(result, result.get("solver_report"))


def _decomposition(ctx: Context, claim: Claim, progress: Progress) -> Outcome:
    """The paper's decomposition (Table 5) on a checkpoint and its recipe (no recorded run:
    no cold start), plus the Tables 6-8 correlations and the Figure 6 mislabel-detection
    curves (a fresh training on corrupted labels) when asked."""
    tenant = claim.job.tenant
    payload = DecompositionPayload.model_validate(claim.job.payload)
    model, config = ctx.checkpoint(tenant, payload.model)
    train_set = ctx.dataset(tenant, payload.train)
    mislabel = None
    if payload.mislabel is not None:  # before the Responder, whose loss checks the targets
        mislabel = build_dataclass(MislabelArguments, payload.mislabel, "mislabel")
        check_mislabel_training_set(train_set.metadata, payload.train)
    responder = Responder(
        config,
        model.state_dict(),
        models.Recipe.from_dict(payload.recipe),
        train_set,
        ResponseArguments(
            **{**payload.response, "damping": payload.damping, "device": str(ctx.device)}
        ),
    )
    # progress shares: the decomposition, then the correlations and the mislabel run
    test = None
    if payload.correlation is not None and payload.test is not None:
        # loaded and checked before the retraining, so bad points fail the job at once
        test = ctx.test_points(tenant, payload.test, payload)
    phases = ["decomposition"] + ["correlation"] * (payload.correlation is not None)
    phases += ["mislabel"] * (mislabel is not None)
    bounds = {name: (i / len(phases), (i + 1) / len(phases)) for i, name in enumerate(phases)}
    arguments = DecompositionArguments(**payload.arguments)
    result = decompose(
        responder, arguments, phase_progress(progress, *bounds["decomposition"])
    ).to_dict()
    if payload.correlation is not None and test is not None:
        correlation = correlate(
            responder,
            test,
            CorrelationArguments(**payload.correlation),
            phase_progress(progress, *bounds["correlation"]),
        )
        result["correlation"] = correlation.to_dict()
    if mislabel is not None:
        found = detect_mislabels_on(
            config,
            responder.recipe,
            responder.dataset,
            responder.arguments,
            mislabel,
            phase_progress(progress, *bounds["mislabel"]),
        )
        result["mislabel"] = found.to_dict()
    return Outcome(result, result.get("solver_report"))


_HANDLERS: dict[JobKind, Callable[[Context, Claim, Progress], Outcome | None]] = {
    JobKind.INFLUENCE: _influence,
    JobKind.SELF_INFLUENCE: _self_influence,
    JobKind.VERIFY: _verify,
    JobKind.DECOMPOSITION: _decomposition,
    JobKind.SCORE_SHARD: _score_shard,
}


def run_job(ctx: Context, claim: Claim, progress: Progress) -> Outcome | None:
    """Run the handler of ``claim``'s job kind."""
    return _HANDLERS[claim.job.kind](ctx, claim, progress)
