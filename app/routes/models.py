"""``/models``: upload (validated before anything is stored), list, get, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

import models
from app.deps import Caller, Svc, model_record
from app.routes import multipart_upload
from app.schemas import ModelRecord
from models.safetensors_io import parse_json
from worker.store import MAX_NAME_LENGTH

router = APIRouter(prefix="/models", tags=["models"])


def _public(record: dict[str, Any]) -> ModelRecord:
    """The public view of a registry record (the artifact id stays internal)."""
    return ModelRecord.model_validate({k: v for k, v in record.items() if k != "artifact"})


def _parse_config(text: str | None) -> dict[str, Any] | None:
    """The ``config`` form field as a JSON object (None when absent), or 400."""
    if text is None or not text.strip():
        return None
    try:
        config = parse_json(text)
    except ValueError as exc:
        raise HTTPException(400, f"config: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise HTTPException(400, "config: must be a JSON object")
    return config


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": multipart_upload(
            "weights",
            "safetensors checkpoint",
            config={
                "type": "string",
                "description": 'JSON config, e.g. {"architecture": "mlp", ...}; optional when '
                "the file embeds it",
            },
        )
    },
}


@router.post(
    "", status_code=201, response_model=ModelRecord, openapi_extra={"requestBody": _UPLOAD_BODY}
)
async def upload_model(services: Svc, caller: Caller, request: Request) -> ModelRecord:
    """Register a checkpoint. It is validated (structure, keys, shapes, dtypes, finite
    values) before a byte is stored; it is stored under its content id. The body is read
    only once the API key is accepted."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(415, "POST /models takes multipart/form-data (field 'weights')")
    async with request.form(max_files=1, max_fields=3) as form:
        upload, config, name = form.get("weights"), form.get("config"), form.get("name")
        if upload is None or isinstance(upload, str):
            raise HTTPException(422, "weights: a safetensors file upload is required")
        if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME_LENGTH):
            raise HTTPException(422, f"name: must be text of at most {MAX_NAME_LENGTH} characters")
        data = await upload.read()  # the one file allowed: config and name are text
    try:
        record = await run_in_threadpool(
            services.registry.put_model, caller.tenant, _parse_config(config), data, name
        )
    except (models.CheckpointError, models.ConfigError) as exc:
        reason = str(exc).removeprefix("checkpoint: ")  # the library's own prefix
        raise HTTPException(400, f"invalid checkpoint: {reason}") from None
    return _public(record)


@router.get("", response_model=list[ModelRecord])
def list_models(services: Svc, caller: Caller) -> list[ModelRecord]:
    """The caller's models: id, architecture, parameter count, name and config."""
    return [_public(r) for r in services.registry.list_models(caller.tenant)]


@router.get("/{model_id}", response_model=ModelRecord)
def get_model(services: Svc, caller: Caller, model_id: str) -> ModelRecord:
    """One of the caller's models, or 404."""
    return _public(model_record(services, caller.tenant, model_id))


@router.delete("/{model_id}", status_code=204)
def delete_model(services: Svc, caller: Caller, model_id: str) -> Response:
    """Forget the model (jobs that used it keep their results), or 404."""
    if not services.registry.delete_model(caller.tenant, model_id):
        raise HTTPException(404, f"model {model_id} not found")
    return Response(status_code=204)
