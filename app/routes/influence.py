"""Influence queries: ``POST /influence`` (cached or queued), rankings, score matrices,
verification, self-influence and decomposition jobs.

Every score is ``(1/N) ∇L_testᵀ (G + λI)⁻¹ ∇L_i`` (Eqn 20/50): the predicted change of the
test loss when training point i is removed — positive helpful, negative harmful; the
``meaning`` field of each response says so.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, HTTPException, Path, Query, Response
from fastapi.responses import JSONResponse

from app.deps import Caller, Svc, dataset_record, model_record
from app.routes.jobs import job_view, visible
from app.schemas import (
    MAX_TEST_POINTS,
    SCORE_MEANING,
    DatasetTest,
    DecompositionRequest,
    InfluenceRequest,
    InlineTest,
    Item,
    JobAccepted,
    JobView,
    Ranking,
    SelfInfluenceRequest,
    VerifyRequest,
    target_value,
)
from worker.cache import result_key
from worker.contract import JobKind, JobStatus, TestSpec
from worker.queue import JobRecord

router = APIRouter(tags=["influence"])

_QUEUED_OR_CACHED: dict[int | str, dict[str, Any]] = {
    202: {"model": JobAccepted, "description": "queued as a new job"},
    200: {"model": JobView, "description": "answered from the result cache (no new job)"},
}


def _unprocessable(loc: list[str | int], msg: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors."""
    return HTTPException(422, [{"loc": ["body", *loc], "msg": msg, "type": "value_error"}])


def _check_engine_inputs(
    services: Svc, tenant: str, model: str, train: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """404 unless the caller owns the model and the training set; returns both records."""
    return model_record(services, tenant, model), dataset_record(services, tenant, train)


_TOKEN_ID_LIMIT = 2**53  # integers a float64 holds exactly


def _first_bad_row(bad: torch.Tensor) -> int | None:
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def _inline_test(
    services: Svc, model_record: dict[str, Any], train_record: dict[str, Any], test: InlineTest
) -> TestSpec:
    """Store inline test points as a tensor artifact shaped and typed like the training
    set, whose layout comes from its registry record (the data are not loaded). Values
    that the cast would silently change are a 422 naming the row: non-integer or
    out-of-vocabulary token ids, class indices outside the classes, targets of the wrong
    width."""
    layout = services.layout(train_record)
    in_shape, in_dtype = layout["inputs"]["shape"], getattr(torch, layout["inputs"]["dtype"])
    out_shape, out_dtype = layout["targets"]["shape"], getattr(torch, layout["targets"]["dtype"])
    vocab = (model_record.get("config") or {}).get("vocab_size")
    width = math.prod(in_shape)
    for row, values in enumerate(test.inputs):
        if len(values) != width:
            raise _unprocessable(
                ["test", "inputs", row],
                f"has {len(values)} values; the training inputs have {width} (shape {in_shape})",
            )
    inputs = torch.tensor(test.inputs, dtype=torch.float64)
    if not in_dtype.is_floating_point:  # token ids
        limit = vocab or _TOKEN_ID_LIMIT
        row = _first_bad_row((inputs != inputs.round()) | (inputs < 0) | (inputs >= limit))
        if row is not None:
            bound = vocab if vocab else "∞"
            raise _unprocessable(
                ["test", "inputs", row], f"must hold integer token ids in [0, {bound})"
            )
    out_width = math.prod(out_shape)
    for row, value in enumerate(test.targets):
        count = len(value) if isinstance(value, list) else 1
        if count != out_width:
            raise _unprocessable(
                ["test", "targets", row],
                f"has {count} value(s); the training targets have {out_width} per example "
                f"(shape {out_shape})",
            )
    targets = torch.tensor(
        [v if isinstance(v, list) else [v] for v in test.targets], dtype=torch.float64
    )
    if not out_dtype.is_floating_point:
        classes = train_record.get("num_classes") or vocab
        limit = classes or _TOKEN_ID_LIMIT
        row = _first_bad_row((targets != targets.round()) | (targets < 0) | (targets >= limit))
        if row is not None:
            raise _unprocessable(
                ["test", "targets", row], f"must be a class index in [0, {classes or '∞'})"
            )
    inputs = inputs.to(in_dtype).reshape(-1, *in_shape)
    targets = targets.to(out_dtype).reshape(-1, *out_shape)
    return TestSpec(artifact=services.store.put_tensors({"inputs": inputs, "targets": targets}))


def _dataset_test(services: Svc, tenant: str, test: DatasetTest) -> TestSpec:
    """Rows of one of the caller's datasets (404 if not theirs, 422 out of range)."""
    size = dataset_record(services, tenant, test.dataset)["size"]
    bad = [i for i in test.indices if i >= size]
    if bad:
        raise _unprocessable(
            ["test", "indices"], f"{bad[:5]} out of range for dataset {test.dataset} of size {size}"
        )
    return TestSpec(dataset=test.dataset, indices=test.indices)


def _cached_or_submit(
    services: Svc, tenant: str, kind: JobKind, payload: dict[str, Any]
) -> JSONResponse:
    """200 with the tenant's finished job for the same query, else 202 with a new job."""
    key = result_key(kind, payload)
    cached = services.queue.cached_job(tenant, key)
    if cached is not None:
        return JSONResponse(job_view(cached, cached=True).model_dump(mode="json"), 200)
    job = services.queue.submit(kind, payload, tenant=tenant, cache_key=key)
    return JSONResponse(JobAccepted(job=job, status=JobStatus.QUEUED).model_dump(), 202)


@router.post("/influence", status_code=202, responses=_QUEUED_OR_CACHED)
def post_influence(services: Svc, caller: Caller, request: InfluenceRequest) -> JSONResponse:
    """Scores of every training point for each test point (one job for all of them)."""
    count = len(
        request.test.targets if isinstance(request.test, InlineTest) else request.test.indices
    )
    if count > services.settings.max_test_points:
        raise _unprocessable(
            ["test"],
            f"{count} test points; this deployment allows at most "
            f"{services.settings.max_test_points} per request",
        )
    model, train = _check_engine_inputs(services, caller.tenant, request.model, request.train)
    if isinstance(request.test, InlineTest):
        test = _inline_test(services, model, train, request.test)
    else:
        test = _dataset_test(services, caller.tenant, request.test)
    payload = request.model_dump(mode="json", exclude={"test"})
    payload["test"] = test.model_dump(mode="json", exclude_none=True)
    return _cached_or_submit(services, caller.tenant, JobKind.INFLUENCE, payload)


@router.post("/self-influence", status_code=202, responses=_QUEUED_OR_CACHED)
def post_self_influence(
    services: Svc, caller: Caller, request: SelfInfluenceRequest
) -> JSONResponse:
    """``(1/N) ∇L_iᵀ (G+λI)⁻¹ ∇L_i`` for every training point: large values flag unusual or
    mislabelled points (appendix D.3). Rank with ``GET /influence/{job}/ranking``."""
    _check_engine_inputs(services, caller.tenant, request.model, request.train)
    payload = request.model_dump(mode="json")
    return _cached_or_submit(services, caller.tenant, JobKind.SELF_INFLUENCE, payload)


def _scored(record: JobRecord | None, job_id: str) -> JobRecord:
    """404 unless ``record`` is the caller's influence/self-influence job, 409 until it has
    succeeded."""
    record = visible(record, job_id)
    if record.kind not in (JobKind.INFLUENCE, JobKind.SELF_INFLUENCE):
        raise HTTPException(404, f"job {job_id} is a {record.kind.value} job, not an influence job")
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
        raise HTTPException(
            422,
            [
                {
                    "loc": ["query", "test"],
                    "msg": f"the job has {num_test} test point(s)",
                    "type": "value_error",
                }
            ],
        )
    values, order = await services.ranked(result["scores"], test, direction == "helpful")
    page_values = values[offset : offset + limit].tolist()
    page_index = order[offset : offset + limit].tolist()
    train_record = await services.dataset_record(caller.tenant, record.payload["train"])
    targets = await services.targets(train_record) if train_record is not None else None
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
    )


@router.get(
    "/influence/{job_id}/scores",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def scores(services: Svc, caller: Caller, job_id: JobId) -> Response:
    """The full score matrix as safetensors: tensor ``scores`` of shape [k, N] (self-
    influence: [N])."""
    record = _scored(services.queue.get(job_id, caller.tenant), job_id)
    data = services.store.get_bytes((record.result or {})["scores"])
    disposition = f'attachment; filename="{job_id}-scores.safetensors"'
    return Response(
        data, media_type="application/octet-stream", headers={"Content-Disposition": disposition}
    )


@router.post("/influence/{job_id}/verify", status_code=202, response_model=JobAccepted)
def verify(
    services: Svc, caller: Caller, job_id: JobId, request: VerifyRequest | None = None
) -> JobAccepted:
    """Ground truth for one query: for its top-k helpful and harmful training points, solve
    the PBRF (or warm-start retraining) and compare predicted with actual test-loss change."""
    record = _scored(services.queue.get(job_id, caller.tenant), job_id)
    if record.kind != JobKind.INFLUENCE:
        raise HTTPException(404, f"job {job_id} is not an influence job")
    request = request or VerifyRequest()
    payload = request.payload(job_id).model_dump(mode="json")
    job = services.queue.submit(JobKind.VERIFY, payload, tenant=caller.tenant)
    return JobAccepted(job=job, status=JobStatus.QUEUED)


@router.post("/decompositions", status_code=202, response_model=JobAccepted)
def decompositions(services: Svc, caller: Caller, request: DecompositionRequest) -> JobAccepted:
    """The paper's decomposition of influence error into its five gaps (Table 5) and the
    test-loss correlations, on a stored checkpoint and its training set (no cold start),
    and with ``mislabel`` the Figure 6 detection curves (classification sets only)."""
    _, train_record = _check_engine_inputs(services, caller.tenant, request.model, request.train)
    if request.mislabel is not None and (
        train_record.get("task") != "classification" or not train_record.get("num_classes")
    ):
        raise _unprocessable(
            ["mislabel"],
            "mislabel detection corrupts class labels and needs a classification training "
            f"set; dataset {request.train} is {train_record.get('task') or 'not classification'}",
        )
    payload = request.model_dump(mode="json", exclude={"test"})
    if request.test is not None:
        test = _dataset_test(services, caller.tenant, request.test)
        payload["test"] = test.model_dump(mode="json", exclude_none=True)
    job = services.queue.submit(JobKind.DECOMPOSITION, payload, tenant=caller.tenant)
    return JobAccepted(job=job, status=JobStatus.QUEUED)
