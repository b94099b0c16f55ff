"""HTTP routes, one module per resource; each validates, delegates to worker/, returns."""

from __future__ import annotations

from worker.store import MAX_NAME_LENGTH


def multipart_upload(file_field: str, description: str, **text_fields: dict) -> dict:
    """OpenAPI ``multipart/form-data`` content of an upload route that reads its form by
    hand (after the API key): one required file, optional text fields, a bounded name."""
    properties = {
        file_field: {"type": "string", "format": "binary", "description": description},
        **text_fields,
        "name": {"type": "string", "maxLength": MAX_NAME_LENGTH, "description": "label"},
    }
    return {"schema": {"type": "object", "required": [file_field], "properties": properties}}
