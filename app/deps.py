"""Typed FastAPI dependencies: the process's services and the authenticated caller.

``Caller`` authenticates (401) and then takes a token from the caller's rate-limit
bucket (429), so every route that declares it is both protected and limited.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Query, Request

from app.auth import Principal
from app.services import Services

__all__ = ["Caller", "EventsCaller", "Svc"]


async def get_services(request: Request) -> Services:
    return request.app.state.services


Svc = Annotated[Services, Depends(get_services)]


async def _caller(
    services: Svc,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
) -> Principal:
    principal = services.api_keys.authenticate(authorization)
    await services.limiter.check(principal.key_id)
    return principal


async def _events_caller(
    services: Svc,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
    api_key: Annotated[
        str | None, Query(description="API key, for EventSource clients that cannot set headers")
    ] = None,
) -> Principal:
    principal = services.api_keys.authenticate(authorization, api_key)
    await services.limiter.check(principal.key_id)
    return principal


Caller = Annotated[Principal, Depends(_caller)]
EventsCaller = Annotated[Principal, Depends(_events_caller)]
