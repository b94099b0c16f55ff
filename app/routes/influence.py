"""Influence queries: ``POST /influence`` (cached or queued), rankings, score matrices,
verification, self-influence and decomposition jobs.

Every score is ``(1/N) ∇L_testᵀ (G + λI)⁻¹ ∇L_i`` (Eqn 20/50): the predicted change of the
test loss when training point i is removed — positive helpful, negative harmful; the
``meaning`` field of each response says so.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import FileResponse, JSONResponse

from app.deps import Caller, Svc
from app.routes.jobs import job_view, visible
from app.schemas import (
    MAX_TEST_POINTS,
    SCORE_MEANING,
    DecompositionRequest,
    InfluenceRequest,
    InlineTest,
    Item,
    JobAccepted,
    JobView,
    Ranking,
    SelfInfluenceRequest,
    VerifyRequest,
    meaning_of,
)
from app.services import ConflictError, Submission, UnprocessableError
from app.views import target_value
from influence.decomposition import DecompositionArguments
from influence.experiments.config import CorrelationArguments, MislabelArguments
from models import Recipe
from worker.contract import JobKind, JobStatus, check_mislabel_training_set
from worker.queue import JobRecord
from worker.store import ArtifactNotFoundError

router = APIRouter(tags=["influence"])

_QUEUED_OR_CACHED: dict[int | str, dict[str, Any]] = {
    202: {
        "model": JobAccepted,
        "description": "queued as a new job, or joined to the job "
        "an identical query submitted that is still queued or running",
    },
    200: {"model": JobView, "description": "answered from the result cache (no new job)"},
}


def _answer(submission: Submission, kind: JobKind) -> JSONResponse:
    """200 with the finished job (result cache), else 202 with the queued/running job."""
    if submission.cached is not None:
        return JSONResponse(job_view(submission.cached, cached=True).model_dump(mode="json"), 200)
    body = JobAccepted(job=submission.job, status=submission.status.value, meaning=meaning_of(kind))
    return JSONResponse(body.model_dump(), 202)


@router.post("/influence", status_code=202, responses=_QUEUED_OR_CACHED)
def post_influence(services: Svc, caller: Caller, request: InfluenceRequest) -> JSONResponse:
    """Scores of every training point for each test point (one job for all of them)."""
    inline = isinstance(request.test, InlineTest)
    count = len(request.test.targets if inline else request.test.indices)
    if count > services.settings.max_test_points:
        raise UnprocessableError(  # under the shape meant, as the schema's errors are
            ("body", "test", "inline") if inline else ("body", "test", "dataset", "indices"),
            f"{count} test points; this deployment allows at most "
            f"{services.settings.max_test_points} per request",
        )
    model, train = services.engine_inputs(caller.tenant, request.model, request.train, request.loss)
    if inline:
        test = services.inline_test(model, train, request.test)
    else:
        test = services.dataset_test(
            caller.tenant, request.test, train, loc=("body", "test", "dataset")
        )
    payload = request.model_dump(mode="json", exclude={"test"})
    payload["test"] = test.model_dump(mode="json", exclude_none=True)
    submission = services.submit_query(caller.tenant, JobKind.INFLUENCE, payload)
    return _answer(submission, JobKind.INFLUENCE)


@router.post("/self-influence", status_code=202, responses=_QUEUED_OR_CACHED)
def post_self_influence(
    services: Svc, caller: Caller, request: SelfInfluenceRequest
) -> JSONResponse:
    """``(1/N) ∇L_iᵀ (G+λI)⁻¹ ∇L_i`` for every training point: large values flag unusual or
    mislabelled points (appendix D.3). Rank with ``GET /influence/{job}/ranking``."""
    services.engine_inputs(caller.tenant, request.model, request.train, request.loss)
    payload = request.model_dump(mode="json")
    submission = services.submit_query(caller.tenant, JobKind.SELF_INFLUENCE, payload)
    return _answer(submission, JobKind.SELF_INFLUENCE)


SCORED_KINDS = (JobKind.INFLUENCE, JobKind.SELF_INFLUENCE)


def _scored(
    record: JobRecord | None,
    job_id: str,
    kinds: tuple[JobKind, ...] = SCORED_KINDS,
    what: str = "rankings and score matrices",
) -> JobRecord:
    """``record`` if it is the caller's job of one of ``kinds`` and has succeeded: 404 for
    no such job; 409 naming the job's kind when it is of another kind (the job exists, it
    just has no ``what``), and 409 until it has succeeded."""
    record = visible(record, job_id)
    if record.kind not in kinds:
        wanted = " and ".join(kind.value for kind in kinds)
        raise HTTPException(
            409, f"job {job_id} is a {record.kind.value} job; {what} exist for {wanted} jobs only"
        )
    if record.status != JobStatus.SUCCEEDED:
        raise HTTPException(
            409,
            f"job {job_id} is {record.status.value} (progress {record.progress:.2f}); "
            "scores exist once it has succeeded",
        )
    return record


JobId = Annotated[str, Path(description="id of an influence or self-influence job")]


@router.get("/influence/{job_id}/ranking", response_model=Ranking)
async def ranking(
    services: Svc,
    caller: Caller,
    job_id: JobId,
    test: Annotated[
        int, Query(ge=0, lt=MAX_TEST_POINTS, description="row of the query's test points")
    ] = 0,
    direction: Literal["helpful", "harmful"] = "helpful",
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> Ranking:
    """Training points ordered by score: ``helpful`` = largest first (removing them would
    raise the test loss most), ``harmful`` = most negative first. Read from the stored
    score matrix; no worker is involved. (``async``: a page from the API's cache costs no
    thread hop; reading and sorting a row on a miss runs in the thread pool.)"""
    record = _scored(await services.job(job_id, caller.tenant), job_id)
    result = record.result or {}
    num_test = result.get("num_test", 1)
    if test >= num_test:
        raise UnprocessableError(("query", "test"), f"the job has {num_test} test point(s)")
    values, order = await services.ranked(result["scores"], test, direction == "helpful")
    page_values = values[offset : offset + limit].tolist()
    page_index = order[offset : offset + limit].tolist()
    train_id = record.payload["train"]
    train_record = await services.dataset_record(caller.tenant, train_id)
    targets = await services.targets(train_record) if train_record is not None else None
    warning = None
    if train_record is None:
        warning = (
            f"the job's training set {train_id} was deleted: every item's target is null "
            "(upload the same data again, which gets the same id, to see them)"
        )
    items = [
        Item(index=i, score=s, target=target_value(targets[i]) if targets is not None else None)
        for i, s in zip(page_index, page_values, strict=True)
    ]
    return Ranking(
        job=job_id,
        test=test,
        direction=direction,
        items=items,
        total=len(order),
        offset=offset,
        report=record.report,
        meaning=result.get("meaning", SCORE_MEANING),
        warning=warning,
    )


@router.get(
    "/influence/{job_id}/scores",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        410: {"description": "the job's score matrix is no longer in the artifact store"},
    },
)
def scores(services: Svc, caller: Caller, job_id: JobId) -> FileResponse:
    """The full score matrix as safetensors: tensor ``scores`` of shape [k, N] (self-
    influence: [N]). Streamed from the artifact store's file, never loaded whole."""
    record = _scored(services.queue.get(job_id, caller.tenant), job_id)
    artifact = (record.result or {})["scores"]
    path = services.store.path(artifact)
    if not path.is_file():
        raise ArtifactNotFoundError(f"artifact {artifact} is not in the store")
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{job_id}-scores.safetensors",
    )


@router.post("/influence/{job_id}/verify", status_code=202, response_model=JobAccepted)
def verify(
    services: Svc, caller: Caller, job_id: JobId, request: VerifyRequest | None = None
) -> JobAccepted:
    """Ground truth for one query: for its top-k helpful and harmful training points, solve
    the PBRF (or warm-start retraining) and compare predicted with actual test-loss change.
    ``test`` must be a row of the job's test points (422 naming ``test``). 409 for a job
    that is not an influence job, has not succeeded, or whose model, training set or test
    dataset has been deleted since (verifying retrains on them)."""
    record = _scored(
        services.queue.get(job_id, caller.tenant), job_id, (JobKind.INFLUENCE,), "verifications"
    )
    deleted = services.deleted_inputs(caller.tenant, record.payload)
    if deleted:
        raise ConflictError(
            f"job {job_id} cannot be verified: its {' and its '.join(deleted)} "
            f"{'was' if len(deleted) == 1 else 'were'} deleted, and verifying retrains on "
            "them. Upload the same file again (same content, same id) and retry."
        )
    request = request or VerifyRequest()
    num_test = (record.result or {}).get("num_test", 1)
    if request.test is not None and request.test >= num_test:
        raise UnprocessableError(
            ("body", "test"),
            f"test row {request.test} out of range: job {job_id} has {num_test} test point(s)",
        )
    payload = request.payload(job_id).model_dump(mode="json")
    job = services.queue.submit(JobKind.VERIFY, payload, tenant=caller.tenant)
    return JobAccepted(job=job, status=JobStatus.QUEUED)


def _within_training_set(request: DecompositionRequest, size: int) -> None:
    """422 naming the field when a decomposition asks for more training points than the
    training set of ``size`` examples has: removed points and correlation points would fail
    the job in the worker; PBRF points past N would be cut to N and a fraction that
    corrupts no label would give empty detection curves, so those are refused too."""
    arguments = DecompositionArguments(**request.arguments)
    checks: list[tuple[tuple[str, ...], int]] = []
    if arguments.group_fraction is None:  # distinct single points
        checks.append((("arguments", "num_points"), arguments.num_points))
    if request.correlation is not None:
        checks.append(
            (("correlation", "num_points"), CorrelationArguments(**request.correlation).num_points)
        )
    if request.mislabel is not None:
        mislabel = MislabelArguments(**request.mislabel)
        checks.append((("mislabel", "pbrf_points"), mislabel.pbrf_points))
        if round(mislabel.fraction * size) < 1:
            raise UnprocessableError(
                ("body", "mislabel", "fraction"),
                f"mislabel.fraction = {mislabel.fraction} of the {size} training examples "
                "corrupts no label; raise it",
            )
    for loc, count in checks:
        if count > size:
            raise UnprocessableError(
                ("body", *loc),
                f"{'.'.join(loc)} = {count} exceeds the {size} examples of the training set",
            )


@router.post("/decompositions", status_code=202, response_model=JobAccepted)
def decompositions(services: Svc, caller: Caller, request: DecompositionRequest) -> JobAccepted:
    """The paper's decomposition of influence error into its five gaps (Table 5) and the
    test-loss correlations, on a stored checkpoint and its training set (no cold start),
    and with ``mislabel`` the Figure 6 detection curves (classification sets only)."""
    if request.mislabel is not None:
        services.owned_model(caller.tenant, request.model)
        try:
            check_mislabel_training_set(
                services.owned_dataset(caller.tenant, request.train), request.train
            )
        except ValueError as exc:
            raise UnprocessableError(("body", "mislabel"), str(exc)) from None
    loss = Recipe.from_dict(request.recipe).loss  # validated by DecompositionRequest
    _, train_record = services.engine_inputs(
        caller.tenant, request.model, request.train, loss, loss_loc=("body", "recipe")
    )
    _within_training_set(request, int(train_record["size"]))
    payload = request.model_dump(mode="json", exclude={"test"})
    if request.test is not None:
        test = services.dataset_test(caller.tenant, request.test, train_record)
        payload["test"] = test.model_dump(mode="json", exclude_none=True)
    job = services.queue.submit(JobKind.DECOMPOSITION, payload, tenant=caller.tenant)
    return JobAccepted(job=job, status=JobStatus.QUEUED)  # no meaning: its result is no score
