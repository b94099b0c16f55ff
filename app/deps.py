"""Typed FastAPI dependencies: the process's services and the authenticated caller, and
the registry look-ups that routes share.

``Caller`` authenticates (401) and then takes a token from the caller's rate-limit
bucket (429), so every route that declares it is both protected and limited; refused
keys take theirs from a bucket per client address. The key
travels only in the ``Authorization`` header, never in a URL (where logs and browser
history would keep it).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request

from app.auth import Principal
from app.services import Services

__all__ = ["Caller", "Svc", "dataset_record", "model_record"]


async def get_services(request: Request) -> Services:
    """The app's :class:`Services` (built at startup)."""
    return request.app.state.services


Svc = Annotated[Services, Depends(get_services)]


async def _caller(
    services: Svc,
    request: Request,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
) -> Principal:
    try:
        principal = services.api_keys.authenticate(authorization)
    except HTTPException:
        # refused keys draw from one bucket per client address, so guessing keys is
        # throttled too (429 once it is empty, else the 401)
        client = request.client.host if request.client else "unknown"
        await services.limiter.check(f"refused:{client}")
        raise
    await services.limiter.check(principal.key_id)
    return principal


Caller = Annotated[Principal, Depends(_caller)]


def model_record(services: Services, tenant: str, model_id: str) -> dict[str, Any]:
    """The tenant's registry record of a model, or 404 (``Services.owned_model``)."""
    return services.owned_model(tenant, model_id)


def dataset_record(services: Services, tenant: str, dataset_id: str) -> dict[str, Any]:
    """The tenant's registry record of a dataset, or 404 (``Services.owned_dataset``)."""
    return services.owned_dataset(tenant, dataset_id)
