"""``/datasets``: upload or register a built-in, list, get, delete, and per-row views."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

import models
from app.deps import Caller, Svc, dataset_record
from app.routes import multipart_upload
from app.schemas import BuiltinDatasetRequest
from app.thumbnails import NotAnImageError, render_png
from app.views import DatasetItem, DatasetRecord
from worker.store import MAX_NAME_LENGTH

router = APIRouter(prefix="/datasets", tags=["datasets"])

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": multipart_upload(
            "file", "safetensors with tensors 'inputs' and 'targets'"
        ),
        "application/json": {"schema": BuiltinDatasetRequest.model_json_schema()},
    },
}


def _public(record: dict[str, Any]) -> DatasetRecord:
    """The public view of a registry record (the artifact id stays internal)."""
    extra = {k: v for k, v in record.items() if k not in ("id", "size", "name", "artifact")}
    return DatasetRecord(id=record["id"], size=record["size"], name=record["name"], metadata=extra)


async def _register(services: Svc, tenant: str, request: Request) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            spec = BuiltinDatasetRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            # answered by the app's one handler: loc/msg/type, never the (raw bytes) input
            errors = exc.errors(include_url=False, include_context=False, include_input=False)
            raise RequestValidationError(
                [{**error, "loc": ("body", *error["loc"])} for error in errors]
            ) from None
        return await run_in_threadpool(
            services.registry.put_builtin_dataset, tenant, spec.builtin, spec.split
        )
    if not content_type.startswith("multipart/form-data"):
        raise HTTPException(
            415, "POST /datasets takes multipart/form-data (field 'file') or application/json"
        )
    async with request.form(max_files=1, max_fields=2) as form:
        upload, name = form.get("file"), form.get("name")
        if upload is None or isinstance(upload, str):
            raise HTTPException(422, "file: a safetensors file upload is required")
        if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME_LENGTH):
            raise HTTPException(422, f"name: must be text of at most {MAX_NAME_LENGTH} characters")
        data = await upload.read()
    return await run_in_threadpool(services.registry.put_dataset, tenant, data, name)


@router.post(
    "", status_code=201, response_model=DatasetRecord, openapi_extra={"requestBody": _UPLOAD_BODY}
)
async def create_dataset(services: Svc, caller: Caller, request: Request) -> DatasetRecord:
    """Register a dataset: a safetensors upload (multipart field ``file``) validated before
    it is stored, or JSON ``{"builtin": "digits", "split": "train"}``."""
    try:
        record = await _register(services, caller.tenant, request)
    except models.DatasetError as exc:
        raise HTTPException(400, f"invalid dataset: {exc}") from None
    return _public(record)


@router.get("", response_model=list[DatasetRecord])
def list_datasets(services: Svc, caller: Caller) -> list[DatasetRecord]:
    """The caller's datasets, each with its size and metadata (task, classes, shapes)."""
    return [_public(r) for r in services.registry.list_datasets(caller.tenant)]


@router.get("/{dataset_id}", response_model=DatasetRecord)
def get_dataset(services: Svc, caller: Caller, dataset_id: str) -> DatasetRecord:
    """One of the caller's datasets, or 404."""
    return _public(dataset_record(services, caller.tenant, dataset_id))


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(services: Svc, caller: Caller, dataset_id: str) -> Response:
    """Forget the dataset (jobs that used it keep their results), or 404."""
    if not services.registry.delete_dataset(caller.tenant, dataset_id):
        raise HTTPException(404, f"dataset {dataset_id} not found")
    return Response(status_code=204)


Index = Annotated[int, Path(ge=0, le=10**9, description="row of the dataset")]


def _row(services: Svc, tenant: str, dataset_id: str, index: int) -> models.Dataset:
    """Row ``index`` as a one-example Dataset (only that row is read), or 404."""
    record = dataset_record(services, tenant, dataset_id)
    if index >= record["size"]:
        raise HTTPException(404, f"dataset {dataset_id} has {record['size']} rows; no row {index}")
    return services.dataset_row(record, index)


@router.get("/{dataset_id}/items/{index}.png", response_class=Response)
def item_thumbnail(services: Svc, caller: Caller, dataset_id: str, index: Index) -> Response:
    """The row drawn as a PNG (image data only: ``input_shape`` [H, W] or [C, H, W])."""
    row = _row(services, caller.tenant, dataset_id, index)
    try:
        png = render_png(row.inputs[0], row.metadata.get("input_shape"))
    except NotAnImageError as exc:
        raise HTTPException(400, f"dataset {dataset_id}: {exc}") from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=86400"})


@router.get("/{dataset_id}/items/{index}", response_model=DatasetItem)
def item(services: Svc, caller: Caller, dataset_id: str, index: Index) -> DatasetItem:
    """The row's target and, for classification, its class name."""
    row = _row(services, caller.tenant, dataset_id, index)
    return DatasetItem.of(row, 0, index=index)
