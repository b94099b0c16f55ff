"""API keys: each ``Authorization: Bearer <key>`` names a tenant.

Keys are compared by their SHA-256 digest, so the lookup time does not depend on how many
leading characters of a guess are right. With no keys configured there is one tenant
(``default_tenant``) and no authentication; the CLI then binds to loopback only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from fastapi import HTTPException

__all__ = ["ApiKeys", "Principal"]


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant that owns what they create, and a key id for rate limits."""

    tenant: str
    key_id: str


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """Resolves presented keys to principals; ``open`` when no keys are configured."""

    def __init__(self, keys: dict[str, str], default_tenant: str) -> None:
        self._by_digest = {_digest(key): tenant for key, tenant in keys.items()}
        self._default = Principal(tenant=default_tenant, key_id="anonymous")

    @property
    def open(self) -> bool:
        """No keys configured: every caller is the default tenant."""
        return not self._by_digest

    def authenticate(self, authorization: str | None) -> Principal:
        """Principal for an ``Authorization: Bearer <key>`` header value.

        Raises HTTP 401 when keys are configured and none, or an unknown one, is given.
        """
        if self.open:
            return self._default
        if authorization is None:
            raise _unauthorized("missing API key (Authorization: Bearer <key>)")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise _unauthorized("Authorization header must be 'Bearer <API key>'")
        digest = _digest(credentials.strip())
        tenant = self._by_digest.get(digest)
        if tenant is None:
            raise _unauthorized("unknown API key")
        return Principal(tenant=tenant, key_id=digest[:16])


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})
